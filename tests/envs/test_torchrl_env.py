"""The native TorchRL face: specs, rollouts, collectors, storage of per-episode constants, errors."""

from __future__ import annotations

import pytest
import torch
from tensordict import LazyStackedTensorDict, TensorDict
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.envs import GymEnv
from torchrl.envs.utils import check_env_specs

import fluxguide.envs  # noqa: F401  (registers the ids)
from fluxguide.envs import GuidanceTorchRLEnv, LeanUnbounded, make_torchrl_env
from fluxguide.policies import MLPGuidanceModel, make_probabilistic_actor
from fluxguide import keys
from fluxguide.rewards import CallableReward
from fluxguide.worlds.shapes.rewards import VerifierReward
from tests.envs.conftest import fixed_actions, needs_pretrained
from tests.toy_rewards import brightness


def make_env(world, **kwargs) -> GuidanceTorchRLEnv:
    kwargs.setdefault("reward", CallableReward(brightness))
    kwargs.setdefault("verify", False)
    return GuidanceTorchRLEnv(world, **kwargs)


def test_check_env_specs_ode_and_sde(shapes_random) -> None:
    check_env_specs(make_env(shapes_random, batch_size=3, num_steps=2), seed=0)
    env = make_env(shapes_random, batch_size=2, num_steps=2, mode="sde", control_cost=0.1)
    check_env_specs(env, seed=0)
    assert keys.SDE_STD in env.observation_spec


def test_check_env_specs_on_gym_env_from_registered_id(shapes_random) -> None:
    env = GymEnv("fluxguide/Shapes-v0", backbone=shapes_random, num_steps=2, reward=CallableReward(brightness))
    check_env_specs(env, seed=0)
    assert set(env.observation_spec.keys()) == set(keys.OBSERVATION_KEYS)


def test_specs_do_not_allocate_full_size_bounds(shapes_random) -> None:
    env = make_env(shapes_random, batch_size=8, num_steps=2)
    for key in (keys.IMG, keys.PRED, keys.TXT, keys.VEC):
        spec = env.observation_spec[key]
        assert isinstance(spec, LeanUnbounded)
        for derived in (spec, spec.clone(), spec[0], spec.expand(2, *spec.shape), spec.to(torch.float64)):
            low, high = derived.space.low, derived.space.high
            assert low.shape == derived.shape
            assert low.untyped_storage().nbytes() <= 8 and high.untyped_storage().nbytes() <= 8
    txt_spec = env.observation_spec[keys.TXT]
    assert txt_spec.is_in(torch.zeros(txt_spec.shape)) and not txt_spec.is_in(torch.zeros(txt_spec.shape, dtype=torch.int64))
    assert txt_spec.space.low.min() == torch.finfo(torch.float32).min
    assert env.observation_spec == env.observation_spec.clone()


def test_rollout_with_fixed_actions_matches_core_and_denoise(shapes_random) -> None:
    from fluxguide.sampling import denoise

    env = make_env(shapes_random, batch_size=2, num_steps=3, guidance_scale=0.5)
    actions = fixed_actions(2, 3, env.core.latent_shape)
    env.set_seed(4)
    rollout = env.rollout(3, actions=actions)
    assert rollout.batch_size == (2, 3)
    assert torch.equal(rollout[:, 1]["img"], rollout[:, 0]["next", "img"])
    cond = shapes_random.encode(env.prompts)
    final = denoise(
        shapes_random, rollout[:, 0]["img"], cond.img_ids, cond.txt, cond.txt_ids, cond.vec, env.core.timesteps,
        guidance=None, guidance_model=lambda img, pred, txt, vec, t, i: actions[i], guidance_scale=0.5,
    )
    assert torch.equal(rollout[:, -1]["next", "img"], final)
    assert torch.equal(env.final_images, shapes_random.decode(final))
    assert torch.equal(rollout["next", "reward"][:, -1, 0], brightness(shapes_random.decode(final), []))
    assert rollout["next", "terminated"][:, -1].all() and not rollout["next", "terminated"][:, :-1].any()
    assert not rollout["next", "truncated"].any()


def test_same_seed_identical_rollouts(shapes_random) -> None:
    env = make_env(shapes_random, batch_size=2, num_steps=2)
    actions = fixed_actions(2, 2, env.core.latent_shape)
    env.set_seed(9)
    a = env.rollout(2, actions=actions)
    images_a = env.final_images
    env.set_seed(9)
    b = env.rollout(2, actions=actions)
    assert (a == b).all()
    assert torch.equal(images_a, env.final_images)


def storage_bytes(td: LazyStackedTensorDict) -> tuple[int, dict[str, set[int]]]:
    """Bytes of the unique storages under ``td`` and the storage pointers of each key."""
    seen: dict[int, int] = {}
    ptrs: dict[str, set[int]] = {}
    for step in td.tensordicts:
        for key, value in step.items(include_nested=True, leaves_only=True):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            ptrs.setdefault(key[-1] if isinstance(key, tuple) else key, set()).add(storage.data_ptr())
    return sum(seen.values()), ptrs


def test_rollout_storage_holds_txt_once_per_episode(shapes_random) -> None:
    batch = 4
    totals = {}
    for num_steps in (2, 6):
        env = make_env(shapes_random, batch_size=batch, num_steps=num_steps)
        env.set_seed(0)
        rollout = env.rollout(num_steps, return_contiguous=False)
        assert isinstance(rollout, LazyStackedTensorDict) and rollout.batch_size == (batch, num_steps)
        totals[num_steps], ptrs = storage_bytes(rollout)
        assert len(ptrs[keys.TXT]) == 1 and len(ptrs[keys.VEC]) == 1  # root and next, every step: one tensor
        txt_bytes = rollout.tensordicts[0][keys.TXT].untyped_storage().nbytes()
        # The lazy stack still reads as (B, T, ...) for the algorithms.
        assert rollout[keys.TXT].shape == (batch, num_steps, *env.core.txt_shape)
    step_bytes = batch * 4 * (3 * 64 * 48)  # img, pred and action of one more step, float32
    small = batch * 8 * 8  # t, step, reward, done flags of one more step (at most 8 bytes each)
    growth = totals[6] - totals[2]
    assert growth <= 4 * (step_bytes + small)
    # A contiguous rollout copies txt (root and next) at every step: the check above would fail for it.
    env.set_seed(0)
    dense = env.rollout(6, return_contiguous=True)
    assert dense[keys.TXT].untyped_storage().nbytes() == 6 * txt_bytes
    assert 4 * (step_bytes + small) < 4 * (step_bytes + 2 * txt_bytes)


def test_random_policy_rollout_at_batch_32_and_the_default_number_of_steps(shapes_random) -> None:
    env = make_env(shapes_random, batch_size=32, reward=VerifierReward(), verify=True)
    assert env.core.num_steps == shapes_random.default_num_steps
    env.set_seed(0)
    rollout = env.rollout(env.core.num_steps, return_contiguous=False)  # random actions from the action spec
    assert rollout.batch_size == (32, env.core.num_steps)
    assert rollout["next", "done"][:, -1].all()
    reward = rollout["next", "reward"][:, -1, 0]
    assert set(reward.unique().tolist()) <= {0.0, 1.0}
    assert set(env.last_info["verifier"]) == {"passed", "count", "color", "kind", "position"}


def test_probabilistic_actor_with_sde_std_and_kl_cost_from_loc(shapes_random) -> None:
    env = make_env(shapes_random, batch_size=2, num_steps=3, mode="sde", control_cost=1.0)
    model = MLPGuidanceModel(latent_channels=48, hidden_dim=16, num_layers=2, vec_dim=64)
    actor = make_probabilistic_actor(model, use_sde_std=True)
    env.set_seed(1)
    rollout = env.rollout(3, actor, return_contiguous=False)  # the actor also runs under the lazy stacking
    assert isinstance(rollout, LazyStackedTensorDict)
    # A fresh guidance model outputs loc = 0: the KL of every step is exactly 0, although the sampled
    # actions (std = sde_std) are not 0.
    assert torch.equal(rollout["loc"], torch.zeros_like(rollout["loc"]))
    assert rollout["action"].abs().max() > 0
    assert torch.equal(rollout["next", "reward"][:, :-1], torch.zeros(2, 2, 1))
    torch.testing.assert_close(rollout["scale"][:, :, 0, 0], rollout[keys.SDE_STD][..., 0])


def test_default_number_of_steps_with_a_collector_across_episodes(shapes_random) -> None:
    env = make_env(shapes_random, batch_size=2)
    assert env.core.num_steps == shapes_random.default_num_steps == 20
    policy = TensorDictModule(
        lambda pred: 0.1 * pred, in_keys=[keys.PRED], out_keys=[keys.ACTION]
    )
    # 25 steps per sub-trajectory: one full episode, then the collector resets and starts the next.
    collector = Collector(
        env, policy, frames_per_batch=2 * 25, total_frames=2 * 25, auto_register_policy_transforms=False
    )
    batch = next(iter(collector))
    collector.shutdown()
    assert batch.batch_size == (2, 25)
    assert batch["next", "done"][:, 19].all() and batch["next", "done"].sum() == 2
    assert batch["step"][0, :, 0].tolist() == list(range(20)) + list(range(5))
    assert (batch["next", "reward"][:, 19] != 0).all()


def test_bad_input_raises(shapes_random) -> None:
    env = make_env(shapes_random, batch_size=2, num_steps=1)
    td = env.reset()
    with pytest.raises(ValueError, match="expected \\(2, 64, 48\\)"):
        env.step(td.clone().set("action", torch.zeros(2, 64, 47)))
    with pytest.raises(ValueError, match="NaN/inf"):
        env.step(td.clone().set("action", torch.full((2, 64, 48), float("nan"))))
    out = env.step(td.clone().set("action", torch.zeros(2, 64, 48)))
    assert out["next", "done"].all()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(td.clone().set("action", torch.zeros(2, 64, 48)))
    with pytest.raises(ValueError, match="cannot move a guidance env from cpu to meta"):
        env.to("meta")
    with pytest.raises(RuntimeError, match="partial reset of 1 of 2"):
        env.reset(TensorDict({"_reset": torch.tensor([[True], [False]])}, batch_size=[2]))


@needs_pretrained
def test_make_torchrl_env_default_pretrained() -> None:
    env = make_torchrl_env("fluxguide/Shapes-v0", batch_size=2, num_steps=2)
    check_env_specs(env, seed=0)
