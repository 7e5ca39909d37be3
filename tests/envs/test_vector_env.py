"""The native batched Gymnasium VectorEnv: make_vec, autoreset modes, batch-32 rollout, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import fluxguide.envs  # noqa: F401  (registers the ids)
from fluxguide.envs import GuidanceVectorEnv
from fluxguide import keys
from fluxguide.rewards import CallableReward
from fluxguide.worlds.shapes.rewards import VerifierReward
from tests.toy_rewards import brightness


def make(world, num_envs: int, **kwargs) -> GuidanceVectorEnv:
    kwargs.setdefault("reward", CallableReward(brightness))
    kwargs.setdefault("verify", False)
    return GuidanceVectorEnv(num_envs, world, **kwargs)


def test_make_vec_builds_the_native_vector_env(shapes_random) -> None:
    envs = gym.make_vec(
        "fluxguide/Shapes-v0", num_envs=4, vectorization_mode="vector_entry_point", backbone=shapes_random, num_steps=2,
        samples_per_prompt=2,
    )
    assert isinstance(envs, GuidanceVectorEnv) and envs.num_envs == 4
    assert envs.core.batch_size == 4  # one core, one model call per step for all envs
    assert envs.observation_space[keys.IMG].shape == (4, 64, 48)
    assert envs.single_observation_space[keys.IMG].shape == (64, 48)
    assert envs.action_space.shape == (4, 64, 48)
    obs, info = envs.reset(seed=0)
    assert obs in envs.observation_space
    assert info["prompt"][0] == info["prompt"][1] and info["_prompt"].all()


def test_next_step_autoreset(shapes_random) -> None:
    envs = make(shapes_random, 3, num_steps=2)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    envs.reset(seed=1)
    zeros = np.zeros(envs.action_space.shape, np.float32)
    _, r, term, trunc, _ = envs.step(zeros)
    assert not term.any() and np.all(r == 0)
    obs, r, term, trunc, info = envs.step(zeros)
    assert term.all() and not trunc.any() and np.all(obs[keys.STEP] == 2)
    assert np.allclose(r, info["terminal_reward"]) and info["final_image"].shape == (3, 3, 32, 32)
    # The next call resets (its actions are ignored): reward 0, not terminated, step 0.
    obs, r, term, trunc, info = envs.step(np.full(envs.action_space.shape, np.nan, np.float32))
    assert np.all(obs[keys.STEP] == 0) and np.all(r == 0) and not term.any() and not trunc.any()
    obs, *_ = envs.step(zeros)
    assert np.all(obs[keys.STEP] == 1)


def test_same_step_autoreset(shapes_random) -> None:
    envs = make(shapes_random, 2, num_steps=1, autoreset_mode="SameStep")
    envs.reset(seed=1)
    obs, r, term, _trunc, info = envs.step(np.zeros(envs.action_space.shape, np.float32))
    assert term.all()
    assert np.all(obs[keys.STEP] == 0)  # already the next episode's first observation
    final = info["final_obs"]
    assert final.dtype == object and final[0][keys.STEP][0] == 1 and info["_final_obs"].all()
    assert np.allclose(info["final_info"]["terminal_reward"], r)


def test_disabled_autoreset_requires_reset(shapes_random) -> None:
    envs = make(shapes_random, 2, num_steps=1, autoreset_mode=AutoresetMode.DISABLED)
    envs.reset(seed=0)
    envs.step(np.zeros(envs.action_space.shape, np.float32))
    with pytest.raises(RuntimeError, match="call reset"):
        envs.step(np.zeros(envs.action_space.shape, np.float32))
    obs, _ = envs.reset(options={"reset_mask": np.array([True, True])})
    assert np.all(obs[keys.STEP] == 0)
    with pytest.raises(ValueError, match="reset them all together"):
        envs.reset(options={"reset_mask": np.array([True, False])})


def test_random_policy_rollout_at_batch_32(shapes_random) -> None:
    envs = GuidanceVectorEnv(32, shapes_random, reward=VerifierReward(), num_steps=2)
    envs.action_space.seed(0)
    envs.reset(seed=0)
    for _ in range(2):
        _obs, rewards, term, _trunc, info = envs.step(envs.action_space.sample())
    assert term.all() and rewards.shape == (32,) and rewards.dtype == np.float64
    assert set(np.unique(rewards)) <= {0.0, 1.0}
    assert info["verifier"]["passed"].shape == (32,) and info["_verifier"].all()


def test_seeded_reset_is_reproducible_and_prompts_can_be_fixed(shapes_random) -> None:
    envs = make(shapes_random, 2, num_steps=1)
    a, info_a = envs.reset(seed=5)
    b, info_b = envs.reset(seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a) and list(info_a["prompt"]) == list(info_b["prompt"])
    _, info = envs.reset(options={"prompts": ["a red circle", "a blue bar"]})
    assert list(info["prompt"]) == ["a red circle", "a blue bar"]


def test_bad_input(shapes_random) -> None:
    envs = make(shapes_random, 2, num_steps=1)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(64, 48\), expected \(2, 64, 48\)"):
        envs.step(np.zeros((64, 48), np.float32))
    with pytest.raises(TypeError, match="floating"):
        envs.step(np.zeros((2, 64, 48), np.int64))
    inf = np.zeros((2, 64, 48), np.float32)
    inf[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        envs.step(inf)
    with pytest.raises(TypeError, match="one integer seed"):
        envs.reset(seed=[0, 1])
    with pytest.raises(ValueError, match="unknown reset options"):
        envs.reset(options={"prompt": "a red circle"})
    with pytest.raises(ValueError, match="autoreset_mode must be one of"):
        make(shapes_random, 2, autoreset_mode="sometimes")
    with pytest.raises(ValueError, match="pass num_envs, not batch_size"):
        make(shapes_random, 2, batch_size=3)
