"""Figures of merit of the shapes world: verifier pass rates of a sampler and CLIP caption retrieval."""

from __future__ import annotations

import torch

from fluxguide.backbones.base import sample_prompts
from fluxguide.worlds.shapes.clip import encode_text_tokens, normalize_images
from fluxguide.worlds.shapes.verifier import ATTRIBUTES, verify
from fluxguide.worlds.shapes.world import ShapesWorld


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
