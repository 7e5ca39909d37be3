"""The Gymnasium face (batch 1, numpy) and the registered ids with ``gymnasium.make``."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import fluxguide.envs  # noqa: F401  (registers the ids)
from fluxguide.envs import GuidanceEnv, UnboundedBox
from fluxguide import keys
from fluxguide.rewards import CallableReward
from fluxguide.worlds.shapes.rewards import VerifierReward
from tests.envs.conftest import fixed_actions, needs_pretrained
from tests.toy_rewards import brightness


@pytest.mark.filterwarnings("ignore:.*Box observation space m")  # img / txt are unbounded by nature
def test_check_env_direct_ode(shapes_random) -> None:
    check_env(GuidanceEnv(shapes_random, reward=CallableReward(brightness), num_steps=2), skip_render_check=True)


@pytest.mark.filterwarnings("ignore:.*Box observation space m")
def test_check_env_made_from_registered_id_sde_with_render(shapes_random) -> None:
    env = gym.make("fluxguide/Shapes-v0", backbone=shapes_random, num_steps=2, mode="sde", render_mode="rgb_array")
    check_env(env.unwrapped)  # also builds the env again through env.spec for every render mode
    assert isinstance(env.unwrapped, GuidanceEnv)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8


def test_make_with_module_prefix_imports_the_registration(shapes_random) -> None:
    env = gym.make("fluxguide.envs:fluxguide/Shapes-v0", backbone=shapes_random, num_steps=1)
    assert env.spec.id == "fluxguide/Shapes-v0"
    assert env.spec.kwargs["num_steps"] == 1


def test_episode_spaces_rewards_and_info(shapes_random) -> None:
    env = GuidanceEnv(shapes_random, reward=VerifierReward(), num_steps=2, mode="sde", control_cost=0.01)
    obs, info = env.reset(seed=3, options={"prompt": "a red circle"})
    assert info == {"prompt": "a red circle"}
    assert obs in env.observation_space
    assert obs[keys.IMG].dtype == np.float32 and obs[keys.STEP].dtype == np.int64 and obs[keys.STEP][0] == 0
    assert isinstance(env.observation_space[keys.TXT], UnboundedBox)
    assert env.observation_space[keys.TXT].low.strides == (0, 0)  # no full-size bound arrays
    assert env.action_space.shape == (64, 48) and env.action_space.high.max() == env.core.max_action
    a = env.action_space.sample() * 0.01
    obs, first_reward, terminated, truncated, info = env.step(a)
    assert not terminated and not truncated and first_reward < 0  # the SDE KL cost of a nonzero action
    assert obs[keys.SDE_STD][0] > 0
    obs, reward, terminated, truncated, info = env.step(a)
    assert terminated and not truncated
    assert obs[keys.STEP][0] == 2 and obs[keys.T][0] == 0.0
    assert set(info) == {"prompt", "terminal_reward", "control_cost", "reward_components", "verifier", "final_image"}
    # info["control_cost"] is the episode's total cost (with its coefficient), the first step's included.
    last_cost = info["control_cost"] + first_reward
    assert reward == pytest.approx(info["terminal_reward"] - last_cost, rel=1e-5, abs=1e-6)
    assert isinstance(info["verifier"]["passed"], bool)
    assert info["final_image"].shape == (3, 32, 32)


def test_gym_env_matches_the_core_and_is_seeded(shapes_random) -> None:
    env = GuidanceEnv(shapes_random, reward=CallableReward(brightness), num_steps=3, guidance_scale=2.0)
    actions = fixed_actions(1, 3, env.core.latent_shape)

    def episode(seed: int) -> tuple[list[dict[str, np.ndarray]], list[float], np.ndarray]:
        obs, _ = env.reset(seed=seed)
        observations, rewards = [obs], []
        for a in actions:
            obs, r, *_ , info = env.step(a[0].numpy())
            observations.append(obs)
            rewards.append(r)
        return observations, rewards, info["final_image"]

    first, second, other = episode(5), episode(5), episode(6)
    for o1, o2 in zip(first[0], second[0]):
        assert all(np.array_equal(o1[k], o2[k]) for k in o1)
    assert first[1] == second[1] and np.array_equal(first[2], second[2])
    assert not np.array_equal(first[0][0][keys.IMG], other[0][0][keys.IMG])
    # The observations are copies: modifying one does not touch the env.
    obs, _ = env.reset(seed=5)
    obs[keys.IMG][:] = 0
    assert env.core.img.abs().sum() > 0


def test_bad_actions(shapes_random) -> None:
    env = GuidanceEnv(shapes_random, reward=CallableReward(brightness), num_steps=1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(1, 64, 48\), expected \(64, 48\)"):
        env.step(np.zeros((1, 64, 48), np.float32))
    with pytest.raises(TypeError, match="floating"):
        env.step(np.zeros((64, 48), np.int32))
    with pytest.raises(TypeError, match="numpy array"):
        env.step([0.0] * 48)
    with pytest.raises(ValueError, match="unknown reset options \\['prompts'\\]"):
        env.reset(options={"prompts": ["a red circle"]})
    bad = np.zeros((64, 48), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        env.step(bad)
    env.step(np.zeros((64, 48), np.float32))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros((64, 48), np.float32))


def test_bad_construction(shapes_random) -> None:
    with pytest.raises(ValueError, match="batch_size=1"):
        GuidanceEnv(shapes_random, batch_size=4)
    with pytest.raises(ValueError, match="unknown prompt source 'nope'"):
        gym.make("fluxguide/Shapes-v0", backbone=shapes_random, prompts="nope")
    with pytest.raises(ValueError, match="render_mode"):
        GuidanceEnv(shapes_random, render_mode="human")


def test_flux_id_needs_a_model_path() -> None:
    with pytest.raises(ValueError, match="model_path="):
        gym.make("fluxguide/Flux-v0", prompts=["a cat"])


@needs_pretrained
@pytest.mark.filterwarnings("ignore:.*Box observation space m")
def test_default_make_uses_the_pretrained_world_and_shapes_clip() -> None:
    from fluxguide.rewards import CLIPScore

    env = gym.make("fluxguide/Shapes-v0", num_steps=2)
    core = env.unwrapped.core
    assert isinstance(core.reward, CLIPScore) and core.reward.model is core.backbone.clip
    check_env(env.unwrapped, skip_render_check=True)
