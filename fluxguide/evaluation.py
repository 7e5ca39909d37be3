"""Held-out evaluation of a guidance policy, shared by every training script.

A fixed prompt set sampled with fixed noise (so evaluations of one run, and of different runs with one seed,
are paired comparisons), scored by the reward and, on the shapes world, by the exact verifier.
"""

from __future__ import annotations

import torch
from torch import nn

from fluxguide.backbones.base import Backbone
from fluxguide.sampling.denoise import GuidanceFn, GuidanceScale

#: Evaluation noise is seeded with ``seed + EVAL_SEED_OFFSET``, away from the training streams.
EVAL_SEED_OFFSET = 12345


@torch.no_grad()
def evaluate_guidance(
    backbone: Backbone,
    reward: nn.Module,
    policy: GuidanceFn | None,
    prompts: list[str],
    *,
    samples_per_prompt: int = 2,
    seed: int = 0,
    guidance_scale: GuidanceScale = 1.0,
    num_steps: int | None = None,
    cfg_scale: float = 1.0,
    batch_size: int = 64,
) -> tuple[dict[str, float], torch.Tensor]:
    """Sample ``prompts`` with the guided sampler and score them.

    Args:
        backbone: the base model.
        reward: reward module ``(images, prompts) -> (B,)``.
        policy: the guidance model (``None``: the base sampler). Put in eval mode for the call.
        prompts: the evaluation prompts; each is sampled ``samples_per_prompt`` times.
        seed: the noise seed (offset by :data:`EVAL_SEED_OFFSET`).
        guidance_scale, num_steps, cfg_scale: sampler settings.
        batch_size: images per sampler call.

    Returns:
        ``eval/reward_mean``, ``eval/reward_std`` and, on the shapes world, ``eval/verifier_pass_rate`` and
        ``eval/verifier_<attribute>``; and the images ``(len(prompts) * samples_per_prompt, 3, H, W)``
        (prompt-major).
    """
    from fluxguide.backbones.shapes import ShapesWorld, verify
    from fluxguide.backbones.shapes.evaluation import sample_prompts

    was_training = isinstance(policy, nn.Module) and policy.training
    if isinstance(policy, nn.Module):
        policy.eval()
    try:
        images, all_prompts = sample_prompts(backbone, prompts, samples_per_prompt=samples_per_prompt,
                                             seed=seed + EVAL_SEED_OFFSET, guidance_model=policy,
                                             guidance_scale=guidance_scale, num_steps=num_steps,
                                             cfg_scale=cfg_scale, batch_size=batch_size)
    finally:
        if was_training:
            policy.train()
    rewards = torch.cat([reward(images[i : i + batch_size].to(backbone.device), all_prompts[i : i + batch_size])
                         .float().cpu() for i in range(0, len(all_prompts), batch_size)])
    metrics = {"eval/reward_mean": float(rewards.mean()),
               "eval/reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0}
    if isinstance(backbone, ShapesWorld):
        result = verify(images, all_prompts)
        metrics["eval/verifier_pass_rate"] = result.accuracy
        metrics.update({f"eval/verifier_{k}": float(v.mean()) for k, v in result.scores.items()})
    return metrics, images
