"""PPO over the denoising MDP: advantages, consistent first-minibatch ratios, learning, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from fluxguide.algos.ppo import PPO, PPOConfig, group_advantages, rewards_to_go
from fluxguide.envs import GuidanceTorchRLEnv
from fluxguide.policies import MLPGuidanceModel, make_probabilistic_actor, make_value_network
from fluxguide.rewards import CallableReward, NonFiniteRewardError
from fluxguide.worlds.shapes import ShapesWorld
from tests.toy_rewards import redness


def make_ppo(world: ShapesWorld, mode: str = "sde", advantage: str = "group", reduction: str = "mean",
             clip_epsilon: float = 0.2, lr: float = 3e-3, reward=redness, batch_size: int = 8,
             samples_per_prompt: int = 4, num_steps: int = 4, seed: int = 0, init_kl: float | None = None) -> PPO:
    """A PPO on a redness reward; with ``init_kl`` (0 included) a frozen copy of the initial actor is the
    reference of the KL term."""
    env = GuidanceTorchRLEnv(world, reward=CallableReward(reward) if callable(reward) else reward,
                             prompts=["a red circle", "a blue bar"], batch_size=batch_size,
                             samples_per_prompt=samples_per_prompt, num_steps=num_steps, mode=mode)
    env.set_seed(seed)
    torch.manual_seed(seed)
    model = MLPGuidanceModel(latent_channels=48, hidden_dim=32, num_layers=2, vec_dim=64, grid_size=8)
    actor = make_probabilistic_actor(model, std=0.2, use_sde_std=mode == "sde", log_prob_reduction=reduction)
    critic = make_value_network(48, 16, 1, 64, 8) if advantage == "gae" else None
    params = list(actor.parameters()) + (list(critic.parameters()) if critic is not None else [])
    config = PPOConfig(clip_epsilon=clip_epsilon, advantage=advantage, minibatch_trajectories=4, epochs=2,
                       init_kl=init_kl or 0.0)
    reference = None if init_kl is None else copy.deepcopy(actor)
    return PPO(env, actor, torch.optim.Adam(params, lr=lr), config, critic=critic, reference=reference)


def test_rewards_to_go_and_group_advantages() -> None:
    rewards = torch.tensor([[0.0, -1.0, 3.0], [0.0, 0.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    assert torch.equal(rewards_to_go(rewards), torch.tensor([[2.0, 2.0, 3.0], [1.0, 1.0, 1.0],
                                                             [3.0, 2.0, 2.0], [2.0, 2.0, 2.0]]))
    assert torch.allclose(rewards_to_go(rewards, 0.5)[0], torch.tensor([0.25, 0.5, 3.0]))
    adv, stats = group_advantages(rewards, group_size=2)
    # Group 0 returns at step 0: (2, 1) -> standardised (+1, -1); group 1: (3, 2) -> (+1, -1); at the last
    # step group 1 is flat (2, 2): no signal, advantage 0.
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert torch.equal(adv[2:, 2], torch.zeros(2))
    assert stats["group_reward_mean"] == pytest.approx((1.5 + 2.5) / 2)
    assert stats["zero_std_group_fraction"] == 0.0
    flat, stats = group_advantages(torch.ones(4, 3), group_size=4)
    assert torch.equal(flat, torch.zeros(4, 3)) and stats["zero_std_group_fraction"] == 1.0
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, group_size=3)


@pytest.mark.parametrize(("mode", "advantage", "reduction"), [
    ("sde", "group", "mean"), ("ode", "group", "sum"), ("sde", "gae", "mean"), ("ode", "gae", "mean"),
])
def test_first_minibatch_has_ratio_one_and_no_clipping(shapes_random, mode, advantage, reduction) -> None:
    # A tiny clip range makes any inconsistency between the collected and recomputed log-probs show.
    # A summed log-prob adds seq * C = 3,072 float32 log-densities (each O(1)) per step: recomputing it in another
    # batch layout moves it by up to ~3e-4 nats (float32 rounding of a sum of magnitude ~1e3), so the ratio is 1
    # within 1e-3 there, 1e-5 with the mean; the clip range sits above that.
    tol = 1e-3 if reduction == "sum" else 1e-5
    ppo = make_ppo(shapes_random, mode=mode, advantage=advantage, reduction=reduction, clip_epsilon=10 * max(tol, 1e-4))
    # The checkpoint's names (train_ppo.py has always saved these).
    assert set(ppo.modules) == ({"actor", "critic"} if advantage == "gae" else {"actor"})
    assert ppo.modules["actor"] is ppo.actor and ppo.optimizers == {"policy": ppo.optimizer}
    for _ in range(3):  # every update, not only the first (the policy has moved in between)
        metrics = ppo.update()
        assert metrics["first_mean_ratio"] == pytest.approx(1.0, abs=tol)
        assert metrics["first_max_ratio"] == pytest.approx(1.0, abs=tol)
        assert metrics["first_clip_fraction"] == 0.0
    # ... and the later minibatches did move the policy (the ratio left 1 after the first step).
    assert metrics["clip_fraction"] > 0 or abs(metrics["mean_ratio"] - 1) > 1e-6
    assert ("explained_variance" in metrics) == (advantage == "gae")
    ppo.shutdown()


def test_batches_are_whole_episodes_with_consistent_groups(shapes_random) -> None:
    ppo = make_ppo(shapes_random)
    batch = ppo.collect()
    assert tuple(batch.batch_size) == (8, 4)
    assert batch["step"][:, :, 0].tolist() == [[0, 1, 2, 3]] * 8
    assert batch["next", "done"][:, -1].all() and not batch["next", "done"][:, :-1].any()
    # Trajectories of one group share the prompt (the same vec) and differ only by the policy's noise.
    vec = batch["vec"][:, 0]
    assert torch.equal(vec[0], vec[3]) and not torch.equal(vec[3], vec[4])
    assert not torch.equal(batch["img"][0, -1], batch["img"][1, -1])
    ppo.shutdown()


def test_short_run_raises_the_mean_reward_on_fixed_prompts(shapes_random) -> None:
    ppo = make_ppo(shapes_random, batch_size=16, samples_per_prompt=8, lr=1e-2)
    rewards = [ppo.update()["reward_mean"] for _ in range(25)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    spread = torch.tensor(rewards[:5]).std().item()
    assert last > first + max(0.02, 3 * spread), rewards
    ppo.shutdown()


def test_non_finite_rewards_stop_the_update_before_any_step(shapes_random) -> None:
    ppo = make_ppo(shapes_random, reward=lambda images, prompts: redness(images, prompts) * float("nan"))
    before = [p.detach().clone() for p in ppo.actor.parameters()]
    # Refused where the env takes the reward (issue 27), a FloatingPointError as a non-finite loss is.
    with pytest.raises(NonFiniteRewardError, match="reward function '<lambda>' returned 8 NaN values"):
        ppo.update()
    assert all(torch.equal(a, b) for a, b in zip(before, ppo.actor.parameters()))
    ppo.shutdown()


def test_bad_configurations_raise_clear_errors(shapes_random) -> None:
    with pytest.raises(ValueError, match="advantage must be"):
        PPOConfig(advantage="td")
    with pytest.raises(ValueError, match="clip_epsilon"):
        PPOConfig(clip_epsilon=0.0)
    with pytest.raises(ValueError, match="needs a critic"):
        ppo = make_ppo(shapes_random)
        PPO(ppo.env, ppo.actor, ppo.optimizer, PPOConfig(advantage="gae"))
    with pytest.raises(ValueError, match="minibatch_trajectories=16 exceeds"):
        PPO(ppo.env, ppo.actor, ppo.optimizer, PPOConfig(minibatch_trajectories=16))
    single = make_ppo(shapes_random, samples_per_prompt=1, advantage="gae")
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        PPO(single.env, single.actor, single.optimizer, PPOConfig(advantage="group", minibatch_trajectories=4))


def test_gaussian_kl_matches_torch_and_ignores_point_masses() -> None:
    from fluxguide.algos.ppo import gaussian_kl
    from fluxguide.policies import ReducedNormal

    gen = torch.Generator().manual_seed(0)
    loc_p, loc_q = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    scale_p, scale_q = torch.rand(2, 3, 4, generator=gen) + 0.1, torch.rand(2, 3, 4, generator=gen) + 0.1
    p, q = ReducedNormal(loc_p, scale_p), ReducedNormal(loc_q, scale_q)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(loc_p, scale_p),
                                                 torch.distributions.Normal(loc_q, scale_q)).mean()
    torch.testing.assert_close(gaussian_kl(p, q), expected)
    assert float(gaussian_kl(p, p)) == pytest.approx(0.0, abs=1e-7)
    scale_p[0] = 0.0  # a step the policy does not explore: adds 0, not inf / nan
    kl = gaussian_kl(ReducedNormal(loc_p, scale_p), q)
    assert torch.isfinite(kl) and float(kl) < float(expected) * 2


def test_init_kl_term_starts_at_zero_and_holds_the_policy_near_its_reference(shapes_random) -> None:
    kl = {}
    for weight in (0.0, 100.0):
        ppo = make_ppo(shapes_random, lr=1e-2, init_kl=weight)
        reference = ppo.reference
        batch = ppo.collect()
        assert float(ppo.init_kl_terms(batch.reshape(-1))["init_kl"]) == pytest.approx(0.0, abs=1e-9)  # at start
        metrics = [ppo.update() for _ in range(4)]
        assert metrics[-1]["init_kl"] > 0
        assert ("loss_init_kl" in metrics[-1]) == (weight > 0)
        kl[weight] = metrics[-1]["init_kl"]
        assert all(not p.requires_grad for p in reference.parameters())
        ppo.shutdown()
    assert kl[100.0] < 0.5 * kl[0.0], kl  # Adam moves the weights either way; the term keeps the policy's output near
    with pytest.raises(ValueError, match="init_kl"):
        PPOConfig(init_kl=-0.5)
