"""Pretraining pieces of the shapes world: the rendered data pool, rectified-flow loss and EMA.

Used by ``experiments/pretrain_shapes_world.py``; kept here so tests can run a few steps of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fluxguide.backbones.base import Conditioning
from fluxguide.worlds.shapes.scenes import render, sample_scenes


@dataclass
class ScenePool:
    """A fixed pool of rendered scenes: uint8 images ``(N, 3, 32, 32)`` and their captions."""

    images: torch.Tensor
    captions: list[str]

    @classmethod
    def generate(cls, n: int, seed: int, chunk: int = 1024) -> ScenePool:
        rng = np.random.default_rng(seed)
        images, captions = [], []
        for start in range(0, n, chunk):
            scenes = sample_scenes(min(chunk, n - start), rng)
            images.append((render(scenes) * 255).round().to(torch.uint8))
            captions += [s.caption for s in scenes]
        return cls(torch.cat(images), captions)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """A random batch of float images in [0, 1] and captions."""
        idx = torch.randint(len(self.captions), (size,), generator=generator)
        return self.images[idx].float() / 255, [self.captions[i] for i in idx.tolist()]


def augment_for_clip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light corruptions (blur, noise, brightness) so the tiny CLIP also reads imperfect generated images."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * 0.8
    x = (1 - mix) * images + mix * blur
    x = x * (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator))
    x = x + torch.randn(x.shape, generator=generator) * 0.08 * torch.rand(b, 1, 1, 1, generator=generator)
    return x.clamp(0, 1)


def sample_training_times(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal training times (Esser et al. 2024, §3.1): more weight on the middle of the path."""
    return torch.sigmoid(torch.randn(batch, generator=generator))


def rectified_flow_loss(
    model: torch.nn.Module, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator
) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - x0`` at ``x_t = (1 - t) x0 + t noise``."""
    noise = torch.randn(x0.shape, generator=generator)
    t = sample_training_times(x0.shape[0], generator)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    pred = model(img=xt, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.vec)
    return F.mse_loss(pred, noise - x0)
