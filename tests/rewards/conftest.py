"""Tiny random open_clip models for the reward tests (built in code; nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

from fluxguide.rewards import load_open_clip

#: A tiny open_clip architecture: ViT on 32x32 (4x4 patches of 8), 2-layer text transformer, 16-d joint space.
TINY_CLIP_NAME = "fluxguide-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A tiny random open_clip model (eval mode, frozen) and its tokenizer."""
    torch.manual_seed(seed)
    return load_open_clip(TINY_CLIP_NAME, None, model_cfg=TINY_CLIP_CFG)


@pytest.fixture(scope="session")
def tiny_clip_cfg() -> dict:
    """The tiny open_clip config (a copy)."""
    return json.loads(json.dumps(TINY_CLIP_CFG))


@pytest.fixture(scope="session")
def tiny_clip() -> tuple[torch.nn.Module, object]:
    return build_tiny_clip()


@pytest.fixture
def images() -> torch.Tensor:
    """A batch of 4 random 32x32 RGB images in [0, 1]."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def prompts() -> list[str]:
    """Four prompts for :func:`images`, one repeated (as with several samples per prompt)."""
    return [
        "a red circle",
        "a blue bar on the left of a green triangle",
        "a red circle",
        "a yellow bar",
    ]
