"""Shared pieces of the env tests: fixed action sequences and a mark for the tests that need the trained world.

The shapes world's trained weights are not needed for the env's mechanics (those tests take the random world,
``shapes_random`` of ``tests/conftest.py``); tests that need them skip when the weight files are missing.
"""

from __future__ import annotations

import pytest
import torch

from fluxguide.worlds.shapes.world import WEIGHTS_DIR

WEIGHT_FILES = ("clip.safetensors", "flux.safetensors")
PRETRAINED_AVAILABLE = all((WEIGHTS_DIR / f).is_file() for f in WEIGHT_FILES)
needs_pretrained = pytest.mark.skipif(
    not PRETRAINED_AVAILABLE,
    reason=f"the shapes world's trained weights ({', '.join(WEIGHT_FILES)}) are not in {WEIGHTS_DIR} yet; "
    "build them with experiments/pretrain_shapes_world.py",
)


def fixed_actions(batch: int, num_steps: int, latent_shape: tuple[int, int], scale: float = 0.3, seed: int = 7) -> list[torch.Tensor]:
    """A deterministic nonzero action sequence ``num_steps x (batch, seq, C)``."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn((batch, *latent_shape), generator=g) for _ in range(num_steps)]
