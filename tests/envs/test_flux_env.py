"""``fluxguide/Flux-v0`` on a tiny random Flux pipeline written to disk (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torchrl.envs.utils import check_env_specs

import fluxguide.envs  # noqa: F401  (registers the ids)
from fluxguide.envs import GuidanceEnv, GuidanceVectorEnv, make_torchrl_env
from fluxguide import keys
from fluxguide.rewards import CallableReward
from fluxguide.sampling import denoise
from tests.toy_rewards import brightness

SIZE = {"height": 32, "width": 48, "max_sequence_length": 16}  # 2 x 3 = 6 latent tokens of 16 channels
PROMPTS = ["a red circle on the left of a blue square", "an astronaut riding a horse"]


def test_flux_id_with_gymnasium_make_and_make_vec(flux_folder: Path) -> None:
    kwargs = {"model_path": flux_folder, "prompts": PROMPTS, "reward": CallableReward(brightness), "num_steps": 2, **SIZE}
    env = gym.make("fluxguide/Flux-v0", **kwargs)
    assert isinstance(env.unwrapped, GuidanceEnv)
    obs, _ = env.reset(seed=0)
    assert obs[keys.IMG].shape == (6, 16) and obs[keys.TXT].shape == (16, 32)
    for _ in range(2):
        obs, _reward, terminated, _, info = env.step(np.zeros((6, 16), np.float32))
    assert terminated and info["final_image"].shape == (3, 32, 48) and "verifier" not in info
    envs = gym.make_vec("fluxguide/Flux-v0", num_envs=2, vectorization_mode="vector_entry_point", **kwargs)
    assert isinstance(envs, GuidanceVectorEnv) and envs.action_space.shape == (2, 6, 16)


def test_flux_torchrl_env_matches_denoise_with_distilled_guidance(flux_folder: Path) -> None:
    env = make_torchrl_env(
        "fluxguide/Flux-v0", model_path=flux_folder, prompts=PROMPTS, reward=CallableReward(brightness),
        batch_size=2, num_steps=2, **SIZE,
    )
    check_env_specs(env, seed=0)
    backbone = env.core.backbone
    assert backbone.default_guidance is not None  # FLUX.1-dev-like: the guidance embedding is used
    env.set_seed(3)
    actions = [0.1 * torch.ones(2, 6, 16), -0.2 * torch.ones(2, 6, 16)]
    rollout = env.rollout(2, actions=actions)
    cond = backbone.encode(env.prompts)
    final = denoise(
        backbone, rollout[:, 0]["img"], cond.img_ids, cond.txt, cond.txt_ids, cond.vec, env.core.timesteps,
        guidance=backbone.default_guidance, guidance_model=lambda img, pred, txt, vec, t, i: actions[i],
    )
    assert torch.equal(rollout[:, -1]["next", "img"], final)
