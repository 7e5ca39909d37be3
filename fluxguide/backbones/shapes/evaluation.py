"""Figures of merit of the shapes world: verifier pass rates of a sampler and CLIP caption retrieval."""

from __future__ import annotations

import torch

from fluxguide.backbones.shapes.clip import encode_text_tokens, normalize_images
from fluxguide.backbones.shapes.verifier import ATTRIBUTES, verify
from fluxguide.backbones.shapes.world import ShapesWorld
from fluxguide.sampling.denoise import GuidanceFn, GuidanceScale


@torch.no_grad()
def sample_prompts(
    world: ShapesWorld,
    prompts: list[str],
    samples_per_prompt: int = 4,
    seed: int = 0,
    cfg_scale: float = 1.0,
    guidance_model: GuidanceFn | None = None,
    guidance_scale: GuidanceScale = 1.0,
    num_steps: int | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, list[str]]:
    """Images ``(len(prompts) * samples_per_prompt, 3, H, W)`` and their prompts, with seeded noise.

    The noise depends only on ``seed`` and the sample index, so two samplers evaluated with one seed see the
    same initial noise (paired comparisons).
    """
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(all_prompts), world.latent_seq, world.latent_channels), generator=generator)
    images = []
    for start in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[start : start + batch_size]
        images.append(world.sample(
            chunk, num_steps=num_steps, noise=noise[start : start + len(chunk)].to(world.device, world.dtype),
            cfg_scale=cfg_scale, guidance_model=guidance_model, guidance_scale=guidance_scale,
        ).float().cpu())
    return torch.cat(images), all_prompts


def verifier_pass_rate(world: ShapesWorld, prompts: list[str], **sample_kwargs) -> dict[str, float]:
    """Sample ``prompts`` (see :func:`sample_prompts`) and return the verifier's pass rate and attribute means."""
    images, all_prompts = sample_prompts(world, prompts, **sample_kwargs)
    result = verify(images, all_prompts)
    out = {"pass_rate": result.accuracy, "num_images": float(len(all_prompts))}
    out.update({a: float(result.scores[a].mean()) for a in ATTRIBUTES})
    return out


@torch.no_grad()
def clip_retrieval_accuracy(world: ShapesWorld, images: torch.Tensor, prompts: list[str], candidates: list[str]) -> float:
    """Fraction of images whose true prompt has the highest tiny-CLIP similarity among ``candidates``."""
    clip = world.clip
    _, cand = encode_text_tokens(clip, world.tokenize(candidates))
    cand = torch.nn.functional.normalize(cand, dim=-1)
    img = torch.nn.functional.normalize(clip.encode_image(normalize_images(images.to(world.device))), dim=-1)
    best = (img @ cand.T).argmax(1).cpu()
    index = {c: i for i, c in enumerate(candidates)}
    truth = torch.tensor([index[p] for p in prompts])
    return float((best == truth).float().mean())
