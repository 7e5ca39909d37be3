"""The three faces over one core agree with each other, bit for bit, and with ``denoise``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxguide.envs import GuidanceEnv, GuidanceTorchRLEnv, GuidanceVectorEnv
from fluxguide import keys
from fluxguide.rewards import CallableReward
from fluxguide.sampling import denoise
from tests.envs.conftest import fixed_actions
from tests.toy_rewards import brightness

NUM_STEPS = 3
SEED = 21


def run_torchrl(world, batch: int, actions: list[torch.Tensor], **kwargs):
    env = GuidanceTorchRLEnv(world, reward=CallableReward(brightness), batch_size=batch, num_steps=NUM_STEPS, **kwargs)
    env.set_seed(SEED)
    rollout = env.rollout(NUM_STEPS, actions=actions)
    observations = [{k: rollout[:, i][k].numpy() for k in env.observation_spec} for i in range(NUM_STEPS)]
    observations.append({k: rollout[:, -1]["next", k].numpy() for k in env.observation_spec})
    rewards = rollout["next", "reward"][..., 0].T.numpy()
    return observations, rewards, env.final_images.numpy(), env.prompts


def run_vector(world, batch: int, actions: list[torch.Tensor], **kwargs):
    envs = GuidanceVectorEnv(batch, world, reward=CallableReward(brightness), num_steps=NUM_STEPS, **kwargs)
    obs, info = envs.reset(seed=SEED)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, _, _, info = envs.step(a.numpy())
        observations.append(obs)
        rewards.append(r)
    return observations, np.stack(rewards), info["final_image"], list(info["prompt"])


def run_gym(world, actions: list[torch.Tensor], **kwargs):
    env = GuidanceEnv(world, reward=CallableReward(brightness), num_steps=NUM_STEPS, **kwargs)
    obs, info = env.reset(seed=SEED)
    observations, rewards = [{k: v[None] for k, v in obs.items()}], []
    for a in actions:
        obs, r, _, _, info = env.step(a[0].numpy())
        observations.append({k: v[None] for k, v in obs.items()})
        rewards.append([r])
    return observations, np.array(rewards), info["final_image"][None], [info["prompt"]]


def assert_same_rollouts(a, b) -> None:
    obs_a, rew_a, img_a, prompts_a = a
    obs_b, rew_b, img_b, prompts_b = b
    assert prompts_a == prompts_b
    assert len(obs_a) == len(obs_b) == NUM_STEPS + 1
    for oa, ob in zip(obs_a, obs_b):
        assert set(oa) == set(ob)
        for k in oa:
            assert np.array_equal(oa[k], ob[k].astype(oa[k].dtype)), k
    assert np.array_equal(rew_a.astype(np.float32), rew_b.astype(np.float32))
    assert np.array_equal(img_a, img_b)


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_torchrl_and_vector_env_agree_and_repeat(shapes_random, mode) -> None:
    kwargs = {"mode": mode, "guidance_scale": 1.5, "control_cost": 0.01, "verify": False}
    actions = fixed_actions(3, NUM_STEPS, shapes_random.latent_shape)
    torchrl_run = run_torchrl(shapes_random, 3, actions, **kwargs)
    vector_run = run_vector(shapes_random, 3, actions, **kwargs)
    assert_same_rollouts(torchrl_run, vector_run)
    assert_same_rollouts(torchrl_run, run_torchrl(shapes_random, 3, actions, **kwargs))  # same seed, same everything
    assert (torchrl_run[1][:-1] < 0).all()  # the control cost shows up before the last step


def test_gym_env_agrees_with_the_batched_faces_at_batch_1(shapes_random) -> None:
    kwargs = {"guidance_scale": 0.7, "verify": False}
    actions = fixed_actions(1, NUM_STEPS, shapes_random.latent_shape)
    gym_run = run_gym(shapes_random, actions, **kwargs)
    assert_same_rollouts(gym_run, run_torchrl(shapes_random, 1, actions, **kwargs))
    assert_same_rollouts(gym_run, run_vector(shapes_random, 1, actions, **kwargs))


def test_faces_agree_with_denoise(shapes_random) -> None:
    actions = fixed_actions(2, NUM_STEPS, shapes_random.latent_shape)
    observations, _, final_images, prompts = run_torchrl(shapes_random, 2, actions, guidance_scale=1.5, verify=False)
    cond = shapes_random.encode(prompts)
    noise = torch.from_numpy(observations[0][keys.IMG])
    timesteps = shapes_random.schedule(NUM_STEPS)
    final = denoise(
        shapes_random, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, timesteps, guidance=None,
        guidance_model=lambda img, pred, txt, vec, t, i: actions[i], guidance_scale=1.5,
    )
    assert np.array_equal(observations[-1][keys.IMG], final.numpy())
    assert np.array_equal(final_images, shapes_random.decode(final).numpy())
