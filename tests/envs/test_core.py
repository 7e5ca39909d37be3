"""The batched torch core: dynamics against the sampling functions, rewards, costs, prompts, seeds, errors."""

from __future__ import annotations

import pytest
import torch

from fluxguide.worlds.shapes import heldout_prompts, train_prompts
from fluxguide.envs import GuidanceCore, SDEWindowError, resolve_prompts
from fluxguide import keys
from fluxguide.sampling.sde_actions import sde_action_coefficient, sde_action_std
from fluxguide.rewards import CallableReward
from fluxguide.worlds.shapes.rewards import VerifierReward
from fluxguide.sampling import denoise, sde_mean, sde_step, sde_step_std
from fluxguide.sampling.steps import euler_step
from tests.envs.conftest import fixed_actions
from tests.toy_rewards import brightness


def make_core(world, **kwargs) -> GuidanceCore:
    kwargs.setdefault("reward", CallableReward(brightness))
    kwargs.setdefault("verify", False)
    return GuidanceCore(world, **kwargs)


def run_denoise(world, core: GuidanceCore, noise: torch.Tensor, prompts: list[str], actions=None, scale=1.0):
    cond = world.encode(prompts)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    guidance_model = None if actions is None else (lambda img, pred, txt, vec, t, i: actions[i])
    out = denoise(
        world, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, core.timesteps, guidance=None,
        guidance_model=guidance_model, guidance_scale=scale,
        callback=lambda i, tc, tp, img, pred, used: seen.append((img, pred)),
    )
    return out, seen


def test_ode_step_matches_denoise_with_the_same_actions(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=3, num_steps=4, guidance_scale=1.5)
    actions = fixed_actions(3, 4, core.latent_shape)
    obs, info = core.reset(seed=11)
    noise = obs[keys.IMG].clone()
    observed = [(obs[keys.IMG], obs[keys.PRED])]
    for i, a in enumerate(actions):
        result = core.step(a)
        assert result.terminated == (i == 3)
        observed.append((result.observation[keys.IMG], result.observation[keys.PRED]))
    final, seen = run_denoise(shapes_random, core, noise, info["prompts"], actions, scale=1.5)
    assert torch.equal(core.img, final)
    for (img, pred), (ref_img, ref_pred) in zip(observed, seen):
        assert torch.equal(img, ref_img) and torch.equal(pred, ref_pred)
    # Not vacuous: the actions moved the trajectory away from the base sampler.
    base, _ = run_denoise(shapes_random, core, noise, info["prompts"])
    assert (final - base).abs().max() > 1e-2


def test_zero_action_reproduces_the_base_sampler_and_its_reward(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=2, num_steps=3)
    obs, info = core.reset(seed=3)
    noise = obs[keys.IMG].clone()
    for _ in range(3):
        result = core.step(torch.zeros(2, *core.latent_shape))
    base, _ = run_denoise(shapes_random, core, noise, info["prompts"])
    assert torch.equal(core.img, base)
    expected = brightness(shapes_random.decode(base), info["prompts"])
    assert torch.equal(result.reward, expected)
    assert torch.equal(result.info["terminal_reward"], expected)
    assert torch.equal(core.final_images, shapes_random.decode(base))
    assert result.observation[keys.STEP].flatten().tolist() == [3, 3]
    assert result.observation[keys.T].flatten().tolist() == [0.0, 0.0]
    assert torch.equal(result.observation[keys.PRED], torch.zeros_like(base))


def test_sde_step_is_the_drift_and_the_published_std_makes_it_the_sde(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=2, num_steps=4, mode="sde", noise_level=0.7, guidance_scale=2.0)
    obs, _ = core.reset(seed=5)
    img, pred = obs[keys.IMG], obs[keys.PRED]
    t0, t1 = core.timesteps[0], core.timesteps[1]
    std = sde_action_std(t0, t1, 0.7, 2.0)
    assert torch.equal(obs[keys.SDE_STD], torch.full((2, 1), std))
    loc = 0.2 * torch.randn(2, *core.latent_shape, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, *core.latent_shape, generator=torch.Generator().manual_seed(2))
    result = core.step(loc + std * eps)
    # The env's step is the deterministic drift of the guided prediction...
    assert torch.equal(result.observation[keys.IMG], sde_mean(img, pred + 2.0 * (loc + std * eps), t0, t1, 0.7))
    # ...and with the Gaussian policy N(loc, sde_std^2) it is the SDE step of the guided mean. The action
    # moves the latent by k a with k < 0 (dt < 0), so the policy's noise eps is the SDE's noise -eps.
    ref = sde_step(img, pred + 2.0 * loc, t0, t1, 0.7, noise=-eps)
    torch.testing.assert_close(result.observation[keys.IMG], ref.sample, rtol=1e-5, atol=1e-5)
    assert result.observation[keys.SDE_STD][0, 0].item() == pytest.approx(sde_action_std(t1, core.timesteps[2], 0.7, 2.0))


def test_sde_window_explores_only_its_steps_and_steps_by_euler_elsewhere(shapes_random) -> None:
    # Flow-GRPO-Fast / MixGRPO: SDE steps on a window, the deterministic sampler on the others.
    kwargs = dict(batch_size=2, num_steps=4, noise_level=0.7, guidance_scale=2.0, control_cost=0.1)
    windowed = make_core(shapes_random, mode="sde", sde_window=(1, 3), **kwargs)
    full = make_core(shapes_random, mode="sde", **kwargs)
    assert windowed.sde_window == (1, 3) and full.sde_window == (0, 4)
    assert make_core(shapes_random, num_steps=4).sde_window is None  # ODE mode has no SDE steps
    assert windowed.sde_stds[0] == windowed.sde_stds[3] == 0.0
    assert windowed.sde_stds[1:3] == full.sde_stds[1:3] and min(full.sde_stds) > 0
    obs, _ = windowed.reset(seed=3)
    actions = fixed_actions(2, 4, windowed.latent_shape, scale=0.3)
    for i, a in enumerate(actions):
        assert torch.equal(obs[keys.SDE_STD], torch.full((2, 1), windowed.sde_stds[i]))
        img, pred = windowed.img, windowed.pred
        t0, t1 = windowed.timesteps[i], windowed.timesteps[i + 1]
        result = windowed.step(a)
        obs = result.observation
        if i in (1, 2):
            assert torch.equal(obs[keys.IMG], sde_mean(img, pred + 2.0 * a, t0, t1, 0.7))
            assert not torch.equal(obs[keys.IMG], euler_step(img, pred + 2.0 * a, t0, t1))
        else:  # the Euler step, bit for bit, and no control cost (a deterministic action: the KL has no meaning)
            assert torch.equal(obs[keys.IMG], euler_step(img, pred + 2.0 * a, t0, t1))
            if not result.terminated:
                assert torch.equal(result.reward, torch.zeros(2))
    assert obs[keys.SDE_STD].eq(0).all()  # the terminal state
    assert (result.info["control_cost"] > 0).all()  # the window's steps cost their KL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sde_window": (0, 2)}, r"sde_window \(0, 2\) needs SDE mode"),
        ({"mode": "sde", "sde_window": (2, 2)}, r"0 <= start < stop <= num_steps = 4"),
        ({"mode": "sde", "sde_window": (-1, 2)}, r"0 <= start < stop"),
        ({"mode": "sde", "sde_window": (0, 5)}, r"num_steps = 4"),
        ({"mode": "sde", "sde_window": (0.5, 2)}, r"two integer step indices, got \(0.5, 2\)"),
        ({"mode": "sde", "sde_window": (0, 1, 2)}, r"two integer step indices"),
    ],
)
def test_bad_sde_window_is_refused_with_the_value(shapes_random, kwargs, match) -> None:
    with pytest.raises(SDEWindowError, match=match):
        make_core(shapes_random, num_steps=4, **kwargs)


def test_ode_control_cost_is_mean_squared_action(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=2, num_steps=2, control_cost=0.5)
    core.reset(seed=0)
    a = fixed_actions(2, 1, core.latent_shape)[0]
    result = core.step(a)
    torch.testing.assert_close(result.reward, -0.5 * a.square().mean(dim=(1, 2)))
    last = core.step(a)
    torch.testing.assert_close(last.reward, last.info["terminal_reward"] - 0.5 * a.square().mean(dim=(1, 2)))
    torch.testing.assert_close(last.info["control_cost"], a.square().mean(dim=(1, 2)))


def test_sde_control_cost_is_the_exact_gaussian_kl_of_the_policy_mean(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=2, num_steps=3, mode="sde", noise_level=0.8, control_cost=0.1,
                     guidance_scale=1.5)
    obs, _ = core.reset(seed=9)
    img, pred = obs[keys.IMG], obs[keys.PRED]
    t0, t1 = core.timesteps[0], core.timesteps[1]
    loc = fixed_actions(2, 1, core.latent_shape, scale=0.5)[0]
    action = loc + obs[keys.SDE_STD][0, 0] * torch.randn(loc.shape, generator=torch.Generator().manual_seed(4))
    result = core.step(action, loc=loc)
    # KL(N(mu_policy, s^2) || N(mu_base, s^2)), summed over elements, from the sampling functions alone.
    s = sde_step_std(t0, t1, 0.8)
    mu_policy = sde_mean(img.double(), (pred + 1.5 * loc).double(), t0, t1, 0.8)
    mu_base = sde_mean(img.double(), pred.double(), t0, t1, 0.8)
    kl = ((mu_policy - mu_base) ** 2).sum(dim=(1, 2)) / (2 * s * s)
    torch.testing.assert_close(result.reward.double(), -0.1 * kl, rtol=1e-4, atol=1e-6)
    # The documented closed form ||k u||^2 / (2 sde_step_std^2), in nats.
    k = sde_action_coefficient(t0, t1, 0.8, 1.5)
    torch.testing.assert_close(kl, (k * loc.double()).square().sum(dim=(1, 2)) / (2 * s * s), rtol=1e-4, atol=1e-6)
    # Without loc the cost is the KL of a policy whose mean is the action itself.
    core.reset(seed=9)
    no_loc = core.step(action)
    assert (no_loc.reward < result.reward).all()


def test_terminal_info_has_components_verifier_and_prompts(shapes_random) -> None:
    core = GuidanceCore(shapes_random, reward=VerifierReward(), batch_size=2, num_steps=2)
    assert core.verify  # on by default for the shapes world
    _, info = core.reset(seed=1)
    first = core.step(torch.zeros(2, *core.latent_shape))
    assert first.info == {"prompts": info["prompts"]}
    last = core.step(torch.zeros(2, *core.latent_shape))
    assert set(last.info["reward_components"]) == {"count", "color", "kind", "position"}
    assert set(last.info["verifier"]) == {"passed", "count", "color", "kind", "position"}
    assert torch.equal(last.info["verifier"]["passed"].float(), last.reward)
    assert last.info["final_images"].shape == (2, 3, 32, 32)


def test_shapes_clip_reward_by_name_shares_the_world(shapes_random) -> None:
    core = GuidanceCore(shapes_random, reward="shapes-clip", batch_size=2, num_steps=1, verify=False)
    assert core.reward.model is shapes_random.clip
    core.reset(seed=0)
    result = core.step(torch.zeros(2, *core.latent_shape))
    assert result.reward.shape == (2,) and torch.isfinite(result.reward).all()


def test_samples_per_prompt_groups_identical_prompts_with_different_noise(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=6, samples_per_prompt=3, num_steps=1)
    obs, info = core.reset(seed=2)
    prompts = info["prompts"]
    assert prompts[0:3] == [prompts[0]] * 3 and prompts[3:6] == [prompts[3]] * 3
    txt = obs[keys.TXT]
    assert torch.equal(txt[0], txt[2]) and torch.equal(txt[3], txt[5])
    assert not torch.equal(obs[keys.IMG][0], obs[keys.IMG][1])
    obs, info = core.reset(prompts=["a red circle", "a blue bar"])
    assert info["prompts"] == ["a red circle"] * 3 + ["a blue bar"] * 3
    with pytest.raises(ValueError, match="one prompt per group: 2"):
        core.reset(prompts=["a red circle"])


def test_same_seed_same_episode_and_different_seed_differs(shapes_random) -> None:
    a = make_core(shapes_random, batch_size=3, num_steps=2)
    b = make_core(shapes_random, batch_size=3, num_steps=2)
    obs_a, info_a = a.reset(seed=42)
    obs_b, info_b = b.reset(seed=42)
    assert info_a == info_b
    for k in obs_a:
        assert torch.equal(obs_a[k], obs_b[k])
    obs_c, _ = b.reset(seed=43)
    assert not torch.equal(obs_a[keys.IMG], obs_c[keys.IMG])
    # Without a seed, reset continues the stream: a second episode differs from the first.
    obs_d, _ = a.reset()
    assert not torch.equal(obs_a[keys.IMG], obs_d[keys.IMG])


def test_prompt_sources(tmp_path) -> None:
    assert resolve_prompts("shapes-train") == train_prompts()
    assert resolve_prompts("shapes-heldout") == heldout_prompts()
    assert resolve_prompts(["a red circle", "a blue bar"]) == ["a red circle", "a blue bar"]
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  a green triangle above a blue bar \n")
    assert resolve_prompts(path) == ["a red circle", "a green triangle above a blue bar"]
    assert resolve_prompts(str(path)) == resolve_prompts(path)
    with pytest.raises(ValueError, match=r"unknown prompt source 'shapes-test'.*text file.*'shapes-heldout', 'shapes-train'"):
        resolve_prompts("shapes-test")
    with pytest.raises(ValueError, match="empty"):
        resolve_prompts([])
    with pytest.raises(ValueError, match="prompt 1"):
        resolve_prompts(["a red circle", ""])
    with pytest.raises(TypeError, match="unknown prompt source"):
        resolve_prompts(3)  # type: ignore[arg-type]


def test_unknown_prompt_source_fails_at_construction(shapes_random) -> None:
    with pytest.raises(ValueError, match="unknown prompt source 'coco'"):
        make_core(shapes_random, prompts="coco")


def test_bad_actions_raise_clear_errors(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=2, num_steps=2)
    zero = torch.zeros(2, *core.latent_shape)
    with pytest.raises(RuntimeError, match="before reset"):
        core.step(zero)
    core.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 64\), expected \(2, 64, 48\)"):
        core.step(torch.zeros(2, 64))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        core.step(torch.zeros(2, *core.latent_shape, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch tensor or numpy array"):
        core.step([[0.0]])
    nan = zero.clone()
    nan[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf values"):
        core.step(nan)
    inf = zero.clone()
    inf[0, 0, :2] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/inf values"):
        core.step(inf)
    assert core.step_idx == 0  # rejected actions leave the state untouched
    core.step(zero)
    core.step(zero)
    with pytest.raises(RuntimeError, match="call reset"):
        core.step(zero)


def test_actions_are_clipped_to_max_action(shapes_random) -> None:
    clipped = make_core(shapes_random, batch_size=1, num_steps=2, max_action=0.5)
    reference = make_core(shapes_random, batch_size=1, num_steps=2, max_action=0.5)
    clipped.reset(seed=1)
    reference.reset(seed=1)
    big = torch.full((1, *clipped.latent_shape), 100.0)
    a = clipped.step(big).observation[keys.IMG]
    b = reference.step(torch.full_like(big, 0.5)).observation[keys.IMG]
    assert torch.equal(a, b)


def test_default_action_bounds(shapes_random) -> None:
    assert make_core(shapes_random, num_steps=4).max_action == 10.0
    sde = make_core(shapes_random, num_steps=4, mode="sde", noise_level=0.7)
    assert sde.max_action >= 6 * max(sde.sde_stds)


def test_cfg_scale_makes_pred_the_cfg_prediction(shapes_random) -> None:
    core = make_core(shapes_random, batch_size=2, num_steps=2, cfg_scale=3.0)
    obs, info = core.reset(seed=0)
    cond = shapes_random.encode(info["prompts"])
    t = torch.ones(2)
    expected = shapes_random.with_cfg(3.0)(obs[keys.IMG], cond.img_ids, cond.txt, cond.txt_ids, t, cond.vec)
    torch.testing.assert_close(obs[keys.PRED], expected)
    assert not torch.allclose(obs[keys.PRED], shapes_random.velocity(obs[keys.IMG], 1.0, cond))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 4, "samples_per_prompt": 3}, "not a multiple of samples_per_prompt=3"),
        ({"mode": "ddim"}, "mode must be 'ode' or 'sde'"),
        ({"mode": "sde", "noise_level": 0.0}, "noise_level > 0"),
        ({"control_cost": -1.0}, "control_cost must be >= 0"),
        ({"max_action": float("inf")}, "max_action must be a finite number"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_bad_configuration(shapes_random, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_core(shapes_random, **kwargs)


def test_shared_group_noise_starts_a_group_from_one_noise(shapes_random) -> None:
    core = GuidanceCore(shapes_random, batch_size=6, samples_per_prompt=3, shared_group_noise=True, num_steps=2)
    core.seed(0)
    core.reset()
    img = core.img
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2]) and torch.equal(img[3], img[5])
    assert not torch.equal(img[0], img[3])
