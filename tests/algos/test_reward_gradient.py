"""Reward gradient through the sampler: learning on a fixed batch, truncation, control cost, reward target,
the one-step variant, and refusal of non-finite losses and non-differentiable rewards."""

from __future__ import annotations

import pytest
import torch

from fluxguide.algos import (
    CorrectionRecorder,
    NonFiniteLossError,
    RewardGradient,
    RewardGradientConfig,
    draw_truncation,
    predicted_clean_latent,
    reward_gradient_loss,
    total_loss,
)
from fluxguide.policies import AttentionGuidanceModel, MLPGuidanceModel
from fluxguide.rewards import CallableReward, NonFiniteRewardError, NotDifferentiableError, make_reward

PROMPTS = ["a red circle", "a blue bar on the left of a green triangle", "a yellow triangle above a red bar"]


def policy(kind: str = "attention", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLPGuidanceModel(latent_channels=48, hidden_dim=32, num_layers=2, vec_dim=64, grid_size=8)
    return AttentionGuidanceModel(hidden_dim=32, num_heads=2, num_layers=1, latent_channels=48, txt_dim=64,
                                  vec_dim=64, mlp_ratio=2.0, grid_size=8)


def test_updates_on_a_fixed_batch_raise_the_reward(shapes_random) -> None:
    net = policy()
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    algo = RewardGradient(shapes_random, net, make_reward("shapes-clip", world=shapes_random), optimizer,
                          RewardGradientConfig(num_steps=4, grad_last_k=2, control_cost=0.01))
    assert algo.modules == {"policy": net} and algo.optimizers == {"policy": optimizer}  # the checkpoint's names
    history = []
    for _ in range(6):  # the same prompts and the same noise every update
        metrics = algo.update(PROMPTS, torch.Generator().manual_seed(0))
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
        history.append(metrics["reward_mean"])
    assert history[-1] > history[0] + 0.02, history
    assert metrics["loss"] == pytest.approx(metrics["loss_reward"] + metrics["loss_control"], abs=1e-6)
    assert metrics["grad_last_k"] == 2.0 and metrics["control_cost"] > 0


def test_control_cost_is_scaled_mean_square_correction_and_survives_checkpointing(shapes_random) -> None:
    net = policy("mlp")
    torch.nn.init.normal_(net.out.weight, std=0.05)  # a non-zero correction
    cond = shapes_random.encode(PROMPTS)
    noise = shapes_random.noise(3, torch.Generator().manual_seed(1))
    grads, costs = [], []
    for checkpointing in (False, True):
        out = reward_gradient_loss(shapes_random, shapes_random.decode, net, lambda x, p: x.mean((1, 2, 3)), cond,
                                   noise, shapes_random.schedule(3),
                                   RewardGradientConfig(num_steps=3, guidance_scale=0.5, control_cost=2.0,
                                                        gradient_checkpointing=checkpointing))
        net.zero_grad()
        out.losses["loss_control"].backward()
        grads.append(net.out.weight.grad.clone())
        costs.append(out.metrics["control_cost"])
    torch.testing.assert_close(grads[0], grads[1])
    # Recompute by hand: the mean over steps of 0.5^2 * mean(correction^2).
    recorder = CorrectionRecorder(net, 0.5, 3)
    from fluxguide.sampling import denoise

    denoise(shapes_random, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, shapes_random.schedule(3),
            guidance=None, guidance_model=recorder, guidance_scale=0.5)
    assert sorted(recorder.costs) == [0, 1, 2]
    assert costs[0] == pytest.approx(float(recorder.per_sample_cost().detach().mean()), rel=1e-5)
    # An unpenalised cost is recorded without a graph: one kept here outlives the update (it leaked ~100 MB per
    # update with an MLP policy under gradient checkpointing).
    logged = CorrectionRecorder(net, 0.5, 3, cost_grad=False)
    with torch.enable_grad():
        denoise(shapes_random, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, shapes_random.schedule(3),
                guidance=None, guidance_model=logged, guidance_scale=0.5, guidance_requires_grad=True)
    assert not any(c.requires_grad for c in logged.costs.values())
    torch.testing.assert_close(logged.per_sample_cost(), recorder.per_sample_cost().detach())


def test_truncation_only_differentiates_the_last_k_steps(shapes_random) -> None:
    seen: list[tuple[int, bool]] = []
    net = policy("mlp")

    def spy(img, pred, txt, vec, t, i):
        c = net(img, pred, txt, vec, t, i)
        seen.append((i, c.requires_grad))
        return c

    cond = shapes_random.encode(PROMPTS[:1])
    reward_gradient_loss(shapes_random, shapes_random.decode, spy, lambda x, p: x.mean((1, 2, 3)), cond,
                         shapes_random.noise(1, torch.Generator().manual_seed(0)), shapes_random.schedule(5),
                         RewardGradientConfig(num_steps=5, grad_last_k=2, gradient_checkpointing=False))
    assert seen == [(0, False), (1, False), (2, False), (3, True), (4, True)]
    gen = torch.Generator().manual_seed(0)
    draws = {draw_truncation(5, 3, True, gen) for _ in range(100)}
    assert draws == {1, 2, 3}
    assert draw_truncation(5, None, False) == 5


def test_reward_target_stops_the_gradient_of_samples_past_it(shapes_random) -> None:
    net = policy("mlp")
    before = [p.detach().clone() for p in net.parameters()]
    reward = make_reward("shapes-clip", world=shapes_random)
    algo = RewardGradient(shapes_random, net, reward, torch.optim.SGD(net.parameters(), lr=1.0),
                          RewardGradientConfig(num_steps=3, reward_target=-1.0))  # cosine >= -1: always past it
    metrics = algo.update(PROMPTS, torch.Generator().manual_seed(0))
    assert metrics["loss_reward"] == pytest.approx(1.0) and metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_one_step_variant_learns_and_uses_the_predicted_clean_latent(shapes_random) -> None:
    img, pred, corr = torch.randn(3, 2, 4, 48).unbind(0)
    x0 = predicted_clean_latent(img, pred, corr, torch.tensor([0.5, 0.25]), 2.0)
    torch.testing.assert_close(x0, img - torch.tensor([0.5, 0.25]).view(2, 1, 1) * (pred + 2.0 * corr))
    net = policy("mlp")
    algo = RewardGradient(shapes_random, net, make_reward("shapes-clip", world=shapes_random),
                              torch.optim.Adam(net.parameters(), 1e-2),
                          RewardGradientConfig(num_steps=4), one_step=True)
    first = algo.update(PROMPTS, torch.Generator().manual_seed(0))
    for _ in range(4):
        last = algo.update(PROMPTS, torch.Generator().manual_seed(0))  # same noise, same sampled step
    assert last["step_idx"] == first["step_idx"]
    assert last["reward_mean"] > first["reward_mean"] + 0.01


def test_non_finite_loss_is_refused_and_leaves_the_policy_unchanged(shapes_random) -> None:
    net = policy("mlp")
    before = [p.detach().clone() for p in net.parameters()]
    # A finite reward whose gradient is NaN (sqrt at 0): the gradient is refused before the step.
    nan_grad = CallableReward(lambda images, prompts: (images.mean((1, 2, 3)) * 0).sqrt(), differentiable=True)
    algo = RewardGradient(shapes_random, net, nan_grad, torch.optim.Adam(net.parameters(), 1e-2),
                          RewardGradientConfig(num_steps=2))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm nan.*update was skipped"):
        algo.update(PROMPTS, torch.Generator().manual_seed(0))
    # A NaN reward is refused where it enters, naming the reward, before any loss is formed (issue 27).
    algo.reward = CallableReward(lambda images, prompts: images.mean((1, 2, 3)) * float("nan"), name="nan")
    with pytest.raises(NonFiniteRewardError, match="reward function 'nan' returned 3 NaN values"):
        algo.update(PROMPTS, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_non_differentiable_reward_and_bad_settings_are_rejected(shapes_random) -> None:
    net = policy("mlp")
    with pytest.raises(NotDifferentiableError, match="use PPO"):
        RewardGradient(shapes_random, net, make_reward("verifier"), torch.optim.Adam(net.parameters()))
    with pytest.raises(ValueError, match=r"grad_last_k must be in \[1, num_steps=4\]"):
        RewardGradientConfig(num_steps=4, grad_last_k=5)
    with pytest.raises(ValueError, match="no loss terms"):
        total_loss({"reward": torch.tensor(1.0)})


def test_control_cost_reaches_the_policy_at_untruncated_steps_but_the_trajectory_stays_detached(shapes_random) -> None:
    net = policy("mlp")
    torch.nn.init.normal_(net.out.weight, std=0.05)
    cond = shapes_random.encode(PROMPTS[:2])
    out = reward_gradient_loss(shapes_random, shapes_random.decode, net, lambda x, p: x.mean((1, 2, 3)), cond,
                               shapes_random.noise(2, torch.Generator().manual_seed(0)), shapes_random.schedule(4),
                               RewardGradientConfig(num_steps=4, grad_last_k=1, control_cost=1.0))
    net.zero_grad()
    out.losses["loss_reward"].backward(retain_graph=True)
    reward_only = net.out.weight.grad.clone()
    net.zero_grad()
    out.losses["loss_control"].backward()
    assert net.out.weight.grad.abs().sum() > 0 and reward_only.abs().sum() > 0
    # The early steps' costs carry a graph (through the policy alone).
    recorder = CorrectionRecorder(net, 1.0, 4)
    from fluxguide.sampling import denoise

    final = denoise(shapes_random, shapes_random.noise(2, torch.Generator().manual_seed(0)), cond.img_ids, cond.txt,
                    cond.txt_ids, cond.vec, shapes_random.schedule(4), guidance=None, guidance_model=recorder)
    assert not final.requires_grad
    assert all(recorder.costs[i].requires_grad for i in range(4))


def test_straight_through_clamp_and_random_translation() -> None:
    from fluxguide.algos import random_translate, straight_through_clamp

    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = straight_through_clamp(x)
    assert y.tolist() == [0.0, 0.5, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]  # a plain clamp would give [0, 1, 0]
    images = torch.rand(6, 3, 8, 8)
    assert random_translate(images, 0) is images
    shifted = random_translate(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    for i in range(6):  # each image is a translated copy: some offset reproduces it exactly
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        assert any(torch.equal(padded[:, dy : dy + 8, dx : dx + 8], shifted[i]) for dy in range(5) for dx in range(5))


def test_init_kl_is_zero_at_the_start_and_keeps_the_policy_near_its_reference(shapes_random) -> None:
    """RL from a distilled start: the KL to the frozen initial policy is logged, starts at 0 and, as a loss term,
    holds the trained policy nearer its start than training without it."""
    import copy

    drift = {}
    for weight in (0.0, 50.0):
        net = policy("mlp")
        torch.nn.init.normal_(net.out.weight, std=0.05)  # a non-zero start, like a distilled policy
        reference = copy.deepcopy(net)
        algo = RewardGradient(shapes_random, net, make_reward("shapes-clip", world=shapes_random),
                              torch.optim.Adam(net.parameters(), 1e-2),
                              RewardGradientConfig(num_steps=4, init_kl=weight), reference=reference)
        first = algo.update(PROMPTS, torch.Generator().manual_seed(0))
        assert first["init_kl"] == pytest.approx(0.0, abs=1e-12)  # the policy is its reference
        assert ("loss_init_kl" in first) == (weight > 0)
        for _ in range(5):
            metrics = algo.update(PROMPTS, torch.Generator().manual_seed(0))
        assert metrics["init_kl"] > 0
        if weight > 0:
            terms = metrics["loss_reward"] + metrics["loss_init_kl"]
            assert metrics["loss"] == pytest.approx(terms, abs=1e-6)
            assert metrics["loss_init_kl"] == pytest.approx(weight * metrics["init_kl"], rel=1e-5)
        assert all(not p.requires_grad for p in reference.parameters())  # frozen, never stepped
        drift[weight] = metrics["init_kl"]
    assert drift[50.0] < 0.5 * drift[0.0], drift  # Adam moves the weights either way; the term keeps the output near


def test_init_kl_is_the_scaled_mean_square_difference_of_the_corrections(shapes_random) -> None:
    net, other = policy("mlp", seed=0), policy("mlp", seed=1)
    for m in (net, other):
        torch.nn.init.normal_(m.out.weight, std=0.05)
    cond = shapes_random.encode(PROMPTS)
    noise = shapes_random.noise(3, torch.Generator().manual_seed(1))
    out = reward_gradient_loss(shapes_random, shapes_random.decode, net, lambda x, p: x.mean((1, 2, 3)), cond, noise,
                               shapes_random.schedule(3),
                               RewardGradientConfig(num_steps=3, guidance_scale=0.5, init_kl=1.0), reference=other)
    # By hand: replay the trajectory, recording both corrections at each step.
    diffs = []

    def both(img, pred, txt, vec, t, i):
        c = net(img, pred, txt, vec, t, i)
        diffs.append(0.25 * (c - other(img, pred, txt, vec, t, i)).square().flatten(1).mean(1))
        return c

    from fluxguide.sampling import denoise

    with torch.no_grad():
        denoise(shapes_random, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, shapes_random.schedule(3),
                guidance=None, guidance_model=both, guidance_scale=0.5)
    expected = float(torch.stack(diffs).mean(0).mean())
    assert out.metrics["init_kl"] == pytest.approx(expected, rel=1e-4)
    assert float(out.losses["loss_init_kl"]) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="init_kl must be >= 0"):
        RewardGradientConfig(init_kl=-1.0)
