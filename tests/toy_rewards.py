"""Rewards simple enough to compute by hand, for tests that need a reward but not a reward model.

Plain ``(images, prompts) -> (B,)`` callables (wrap them in :class:`fluxguide.rewards.CallableReward`); both are
differentiable, so a policy can climb them in a few updates.
"""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The mean pixel value of each image."""
    return images.mean(dim=(1, 2, 3))


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean red minus mean green-and-blue: how much redder than green-blue each image is."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
