"""Target strategies and the seed's ``GuidanceDataCollector``, on a randomly initialised shapes world.

Each strategy's targets are checked against what they are defined to be: CFG's own prediction, the
reward's gradient (by finite differences), the kept trajectories' final images and next states, the
reference image, the user's function.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxguide import keys
from fluxguide.data.collector import GuidanceDataCollector
from fluxguide.data.episodes import EPISODE, FINAL_IMAGE, REWARD, TARGET
from fluxguide.data.store import load_guidance_dataset
from fluxguide.data.targets import (
    TARGET_STRATEGIES,
    BestOfN,
    CFGDistillation,
    ReferenceImage,
    RewardGradientTargets,
    UserTargets,
    make_target_strategy,
)
from fluxguide.data.teachers import RewardGradientTeacher
from fluxguide.rewards import CallableReward, NotDifferentiableError
from fluxguide.sampling import euler_step
from fluxguide.worlds.shapes import ShapesWorld, train_prompts
from fluxguide.worlds.shapes.rewards import VerifierReward
from fluxguide.worlds.shapes.scenes import render_prompts
from tests.toy_rewards import redness

STEPS = 4


def per_step(chunk, key: str) -> torch.Tensor:
    """A transition entry as ``(E, T, ...)`` (transitions are stored episode-major)."""
    v = chunk.transitions[key]
    return v.reshape(chunk.num_episodes, STEPS, *v.shape[1:])


def test_unknown_strategy_lists_the_valid_ones(shapes_random: ShapesWorld) -> None:
    with pytest.raises(ValueError, match=r"unknown target strategy 'dagger'; valid strategies: \['best_of_n', "
                                         r"'cfg_distillation', 'policy_distillation', 'reference_image', "
                                         r"'reward_gradient', 'user'\]"):
        make_target_strategy("dagger")
    with pytest.raises(ValueError, match="unknown target strategy"):
        GuidanceDataCollector(shapes_random, "cfg", scale=3.0)
    assert sorted(TARGET_STRATEGIES) == ["best_of_n", "cfg_distillation", "policy_distillation", "reference_image",
                                         "reward_gradient", "user"]


def test_cfg_distillation_targets_reproduce_cfg_on_cfgs_own_states(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:3]
    collector = GuidanceDataCollector(shapes_random, "cfg_distillation", num_steps=STEPS, scale=3.0)
    assert isinstance(collector.strategy, CFGDistillation)
    chunk = collector.collect(prompts, seed=1)
    cfg = shapes_random.with_cfg(3.0)
    cond = shapes_random.encode(prompts)
    img, pred, target = per_step(chunk, keys.IMG), per_step(chunk, keys.PRED), per_step(chunk, TARGET)
    ts = shapes_random.schedule(STEPS)
    for k in range(STEPS):
        t = torch.full((3,), ts[k])
        want_cfg = cfg(img=img[:, k], img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.vec)
        cond_pred = shapes_random.velocity(img[:, k], t, cond)
        assert torch.allclose(pred[:, k], cond_pred, atol=1e-5)  # the observation is the base (conditional) call
        assert torch.allclose(pred[:, k] + target[:, k], want_cfg, atol=1e-4)  # pred + target = CFG
        assert float(target[:, k].abs().max()) > 1e-3
    # The states are CFG's trajectory: its final image is CFG's sample from the same noise.
    noise = torch.randn((3, *shapes_random.latent_shape), generator=collector.batch_generator(1, 0))
    want = shapes_random.sample(prompts, num_steps=STEPS, noise=noise, cfg_scale=3.0)
    assert torch.allclose(chunk.episodes[FINAL_IMAGE], want, atol=1e-4)


def test_reward_gradient_targets_are_the_gradient_of_the_reward(shapes_random: ShapesWorld) -> None:
    reward = CallableReward(redness)
    prompts = train_prompts()[:2]
    strategy = RewardGradientTargets(reward, step_size=5.0, guide=False)
    chunk = GuidanceDataCollector(shapes_random, strategy, num_steps=STEPS).collect(prompts)
    img, pred, target = per_step(chunk, keys.IMG), per_step(chunk, keys.PRED), per_step(chunk, TARGET)
    ts = shapes_random.schedule(STEPS)

    def r(p: torch.Tensor, k: int) -> torch.Tensor:  # in float64, so finite differences are exact enough
        return redness(shapes_random.decode(img[:, k].double() - ts[k] * p), prompts)

    for k in range(STEPS):
        assert float(target[:, k].abs().max()) > 0
        # Directional finite difference: R(pred + eps d) - R(pred - eps d) = 2 eps <grad, d>.
        d = torch.randn(pred[:, k].shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        p = pred[:, k].double()
        eps = 1e-6  # small, so no pixel crosses the clamp at 0 or 1 (float64 keeps it exact)
        fd = (r(p + eps * d, k) - r(p - eps * d, k)) / (2 * eps)
        analytic = (target[:, k].double() / 5.0 * d).sum(dim=(1, 2))
        assert torch.allclose(fd, analytic, rtol=1e-4, atol=1e-9)
        # A small step along the target raises the reward.
        assert bool((r(p + 1e-2 * target[:, k].double(), k) > r(p, k)).all())


def test_reward_gradient_guided_collection_and_normalisation(shapes_random: ShapesWorld) -> None:
    reward = CallableReward(redness)
    prompts = train_prompts()[:2]
    base = GuidanceDataCollector(shapes_random, UserTargets(target_fn=lambda s: torch.zeros_like(s[keys.PRED])),
                                 num_steps=STEPS).collect(prompts)
    guided = GuidanceDataCollector(shapes_random, "reward_gradient", num_steps=STEPS, reward=reward, step_size=0.5,
                                   normalize=True).collect(prompts)
    # Normalised: each sample's target has RMS = step size wherever the gradient is not zero.
    rms = per_step(guided, TARGET).pow(2).mean(dim=(2, 3)).sqrt()
    assert torch.allclose(rms[rms > 0], torch.full_like(rms[rms > 0], 0.5), rtol=1e-4)
    assert float(redness(guided.episodes[FINAL_IMAGE], prompts).mean()) > float(redness(base.episodes[FINAL_IMAGE], prompts).mean())
    with pytest.raises(NotDifferentiableError):
        RewardGradientTargets(VerifierReward())
    with pytest.raises(ValueError, match="set teacher.prompts"):
        teacher = RewardGradientTeacher(reward, shapes_random.decode)
        teacher(base.transitions[keys.IMG][:2], base.transitions[keys.PRED][:2], None, None, torch.ones(2), 0)


@pytest.mark.parametrize("target", ["renoise", "endpoint", "step"])
def test_best_of_n_keeps_the_top_k_and_targets_their_trajectories(shapes_random: ShapesWorld, target: str) -> None:
    prompts = train_prompts()[:3]
    strategy = BestOfN(CallableReward(redness), n=4, top_k=2, noise_level=0.7, target=target)
    chunk = GuidanceDataCollector(shapes_random, strategy, num_steps=STEPS).collect(prompts, seed=3)
    assert chunk.num_episodes == 6 and chunk.prompts == [p for p in prompts for _ in range(2)]
    # Recompute all n trajectories' rewards: the kept ones are each prompt's two best.
    everything = BestOfN(CallableReward(redness), n=4, top_k=4, noise_level=0.7, target=target)
    all_chunk = GuidanceDataCollector(shapes_random, everything, num_steps=STEPS).collect(prompts, seed=3)
    all_rewards = all_chunk.episodes[REWARD].reshape(3, 4)
    want = all_rewards.sort(dim=1, descending=True).values[:, :2]
    assert torch.allclose(chunk.episodes[REWARD].reshape(3, 2).sort(dim=1, descending=True).values, want)
    img, pred, tgt = per_step(chunk, keys.IMG), per_step(chunk, keys.PRED), per_step(chunk, TARGET)
    final = shapes_random.encode_images(chunk.episodes[FINAL_IMAGE])
    ts = shapes_random.schedule(STEPS)
    for k in range(STEPS):
        if target in ("renoise", "endpoint"):
            # The clean estimate of the corrected prediction is the kept final image (unclamped pixels only:
            # decode clamps to [0, 1]).
            x0_hat = img[:, k] - ts[k] * (pred[:, k] + tgt[:, k])
            inside = final.abs() < 0.999
            assert torch.allclose(x0_hat[inside], final[inside], atol=1e-4)
        if target == "renoise":
            # States are the forward process from the kept image: x_t = (1 - t) x_0 + t eps, eps ~ N(0, 1),
            # and the observation's prediction is the base model's at that state.
            eps = ((img[:, k] - (1 - ts[k]) * final) / ts[k])[inside]
            assert abs(float(eps.std()) - 1) < 0.1
            cond = shapes_random.encode(chunk.prompts)
            assert torch.allclose(pred[:, k], shapes_random.velocity(img[:, k], ts[k], cond), atol=1e-5)
        if target == "step":
            # The corrected Euler step lands on the trajectory's next state.
            nxt = euler_step(img[:, k], pred[:, k] + tgt[:, k], ts[k], ts[k + 1])
            if k + 1 < STEPS:
                assert torch.allclose(nxt, img[:, k + 1], atol=1e-4)


def test_best_of_n_min_reward_drops_losers_and_checks_arguments(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:2]
    collect = lambda min_reward: GuidanceDataCollector(
        shapes_random, BestOfN(CallableReward(redness), n=4, top_k=4, min_reward=min_reward), num_steps=STEPS
    ).collect(prompts, seed=5)
    rewards = collect(None).episodes[REWARD]
    threshold = float(rewards.median())
    kept = collect(threshold)
    assert kept.num_episodes == int((rewards >= threshold).sum()) < 8
    assert bool((kept.episodes[REWARD] >= threshold).all())
    with pytest.raises(ValueError, match="1 <= top_k <= n"):
        BestOfN(VerifierReward(), n=2, top_k=3)
    with pytest.raises(ValueError, match="'renoise', 'endpoint' or 'step'"):
        BestOfN(VerifierReward(), target="last")


@pytest.mark.parametrize("guide", [True, False])
def test_reference_image_targets_steer_to_the_reference(shapes_random: ShapesWorld, guide: bool) -> None:
    prompts = train_prompts()[:2]
    reference = render_prompts(prompts, seed=0)[0]
    strategy = ReferenceImage(lambda p, g: render_prompts(p, seed=0)[0], strength=1.0, guide=guide)
    chunk = GuidanceDataCollector(shapes_random, strategy, num_steps=STEPS).collect(prompts)
    img, pred, tgt = per_step(chunk, keys.IMG), per_step(chunk, keys.PRED), per_step(chunk, TARGET)
    ts = shapes_random.schedule(STEPS)
    x_ref = shapes_random.encode_images(reference)
    for k in range(STEPS):
        assert torch.allclose(img[:, k] - ts[k] * (pred[:, k] + tgt[:, k]), x_ref, atol=1e-4)
    if guide:  # guided by the teacher, the sampler lands on the reference image
        assert torch.allclose(chunk.episodes[FINAL_IMAGE], reference, atol=1e-5)
    else:  # the base sampler's states: its sample is not the reference
        assert not torch.allclose(chunk.episodes[FINAL_IMAGE], reference, atol=1e-2)
    with pytest.raises(ValueError, match=r"reference latents must be \(2, 64, 48\)"):
        GuidanceDataCollector(shapes_random, ReferenceImage(torch.zeros(3, 64, 48)), num_steps=STEPS).collect(prompts)


def test_user_teacher_and_user_target_function(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:2]
    teacher = lambda img, pred, txt, vec, t, step: 0.1 * img
    strategy = UserTargets(teacher=teacher, guidance_scale=2.0)
    chunk = GuidanceDataCollector(shapes_random, strategy, num_steps=STEPS).collect(prompts)
    assert torch.allclose(chunk.transitions[TARGET], 0.1 * chunk.transitions[keys.IMG], atol=1e-5)
    fn_chunk = GuidanceDataCollector(shapes_random, UserTargets(target_fn=lambda s: s[keys.IMG] - s[keys.PRED]),
                                     num_steps=STEPS).collect(prompts)
    assert torch.equal(fn_chunk.transitions[TARGET], fn_chunk.transitions[keys.IMG] - fn_chunk.transitions[keys.PRED])
    with pytest.raises(ValueError, match="exactly one of teacher"):
        UserTargets()


def test_collect_to_appends_batches_and_resumes_without_duplicates(shapes_random: ShapesWorld, tmp_path: Path) -> None:
    prompts = train_prompts()[:5]
    collector = GuidanceDataCollector(shapes_random, "cfg_distillation", num_steps=STEPS, scale=2.0)
    seen: list[int] = []
    collector.collect_to(tmp_path / "data", prompts[:4], batch_size=2, seed=7, on_chunk=lambda i, c: seen.append(i))
    assert seen == [0, 1]
    # A rerun over the full list (as after a crash) collects only the missing batch.
    data = collector.collect_to(tmp_path / "data", prompts, batch_size=2, seed=7, on_chunk=lambda i, c: seen.append(i))
    assert seen == [0, 1, 2]
    assert data.num_episodes == 5 and data.prompts == prompts
    assert data.metadata["strategy"] == "cfg_distillation" and data.metadata["cfg_scale"] == 2.0
    # Collection is deterministic given (seed, batch): batch 1 recollected equals what is on disk.
    again = collector.collect(prompts[2:4], seed=7, batch_index=1)
    stored = load_guidance_dataset(tmp_path / "data").transitions()
    on_disk = stored[(stored[EPISODE] >= 2) & (stored[EPISODE] < 4)]
    assert torch.allclose(on_disk[TARGET], again.transitions[TARGET])
    with pytest.raises(Exception, match="cfg_scale"):
        GuidanceDataCollector(shapes_random, "cfg_distillation", num_steps=STEPS, scale=4.0).collect_to(
            tmp_path / "data", prompts)


def test_cfg_distillation_with_a_student_labels_the_students_states(shapes_random: ShapesWorld) -> None:
    """DAgger: the student drives the sampler, CFG's correction labels every state it visits."""
    from fluxguide.policies import MLPGuidanceModel

    torch.manual_seed(4)
    student = MLPGuidanceModel(latent_channels=48, hidden_dim=16, num_layers=1, vec_dim=64)
    torch.nn.init.normal_(student.out.weight, std=0.05)  # a student that is not CFG and not the base sampler
    prompts = train_prompts()[:2]
    collector = GuidanceDataCollector(shapes_random, CFGDistillation(3.0, student=student), num_steps=STEPS)
    chunk = collector.collect(prompts, seed=2)
    assert chunk.metadata["visited_by"] == "student"
    noise = torch.randn((2, *shapes_random.latent_shape), generator=collector.batch_generator(2, 0))
    assert torch.allclose(chunk.episodes[FINAL_IMAGE], shapes_random.sample(prompts, num_steps=STEPS, noise=noise,
                                                                  guidance_model=student), atol=1e-5)
    cfg, cond = shapes_random.with_cfg(3.0), shapes_random.encode(prompts)
    img, pred, target = per_step(chunk, keys.IMG), per_step(chunk, keys.PRED), per_step(chunk, TARGET)
    for k, t in enumerate(shapes_random.schedule(STEPS)[:-1]):
        want = cfg(img=img[:, k], img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids,
                   timesteps=torch.full((2,), t), y=cond.vec)
        assert torch.allclose(pred[:, k] + target[:, k], want, atol=1e-4)


def test_prompt_swaps_label_each_trajectory_under_the_other_prompts(shapes_random: ShapesWorld) -> None:
    """Swapped episodes: another episode's latents, this prompt's text, its conditional call and CFG's target."""
    prompts = train_prompts()[:3]
    plain = GuidanceDataCollector(shapes_random, CFGDistillation(3.0), num_steps=STEPS).collect(prompts, seed=1)
    swapped = CFGDistillation(3.0, prompt_swaps=2)
    chunk = GuidanceDataCollector(shapes_random, swapped, num_steps=STEPS).collect(prompts, seed=1)
    assert chunk.num_episodes == 9 and chunk.num_transitions == 9 * STEPS and chunk.metadata["prompt_swaps"] == 2
    img, pred, target = per_step(chunk, keys.IMG), per_step(chunk, keys.PRED), per_step(chunk, TARGET)
    # The first three episodes are the sampled ones, unchanged by the swaps.
    assert chunk.prompts[:3] == prompts
    assert torch.equal(img[:3], per_step(plain, keys.IMG)) and torch.equal(target[:3], per_step(plain, TARGET))
    cfg, ts = shapes_random.with_cfg(3.0), shapes_random.schedule(STEPS)
    for swap in (1, 2):
        rows = range(3 * swap, 3 * swap + 3)
        swapped_prompts = chunk.prompts[3 * swap : 3 * swap + 3]
        assert sorted(swapped_prompts) == sorted(prompts)  # a permutation of the batch's prompts ...
        assert all(q != p for q, p in zip(swapped_prompts, prompts, strict=True))  # ... without fixed points
        cond = shapes_random.encode(swapped_prompts)
        assert torch.allclose(chunk.episodes[keys.TXT][list(rows)], cond.txt, atol=1e-6)
        assert torch.equal(img[list(rows)], img[:3])  # the latents of the sampled trajectories
        for k in range(STEPS):
            t = torch.full((3,), ts[k])
            x = img[list(rows), k]
            assert torch.allclose(pred[list(rows), k], shapes_random.velocity(x, t, cond), atol=1e-5)
            want = cfg(img=x, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.vec)
            assert torch.allclose(pred[list(rows), k] + target[list(rows), k], want, atol=1e-4)
    with pytest.raises(ValueError, match="prompt_swaps must be >= 0"):
        CFGDistillation(3.0, prompt_swaps=-1)
    with pytest.raises(ValueError, match="at least 2 prompts per batch"):
        GuidanceDataCollector(shapes_random, CFGDistillation(3.0, prompt_swaps=1), num_steps=STEPS).collect(
            prompts[:1], seed=1)


def test_best_of_n_renoises_each_kept_image_several_times(shapes_random: ShapesWorld) -> None:
    prompts = train_prompts()[:2]
    strategy = BestOfN(CallableReward(redness), n=3, top_k=1, renoise_samples=3)
    chunk = GuidanceDataCollector(shapes_random, strategy, num_steps=STEPS).collect(prompts, seed=4)
    assert chunk.num_episodes == 2 and chunk.num_transitions == 2 * 3 * STEPS
    tr = chunk.transitions
    assert torch.equal(tr[keys.STEP], torch.arange(STEPS).repeat(3).repeat(2))
    ts = torch.tensor(shapes_random.schedule(STEPS))
    assert torch.allclose(tr[keys.T], ts[tr[keys.STEP]])
    final = shapes_random.encode_images(chunk.episodes[FINAL_IMAGE])[tr[EPISODE]]
    x0_hat = tr[keys.IMG] - tr[keys.T][:, None, None] * (tr[keys.PRED] + tr[TARGET])
    inside = final.abs() < 0.999
    assert torch.allclose(x0_hat[inside], final[inside], atol=1e-4)
    # The three re-noisings of one (image, time) differ; each prediction is the base model's at its state.
    assert not torch.allclose(tr[keys.IMG][1], tr[keys.IMG][1 + STEPS])
    cond = shapes_random.encode([chunk.prompts[i] for i in tr[EPISODE].tolist()])
    assert torch.allclose(tr[keys.PRED], shapes_random.velocity(tr[keys.IMG], tr[keys.T], cond), atol=1e-5)
    with pytest.raises(ValueError, match="renoise_samples must be >= 1"):
        BestOfN(CallableReward(redness), renoise_samples=0)
