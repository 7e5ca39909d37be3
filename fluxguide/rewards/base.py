"""The reward contract: ``forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` plus ``differentiable``.

Subclasses implement :meth:`RewardModel.score`; :meth:`RewardModel.forward` validates the inputs and the
output around it, so every reward rejects bad input the same way. Rewards never decide on ``no_grad``:
a reward-gradient algorithm calls them with gradients on, PPO calls them under ``torch.no_grad()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from fluxguide.errors import UserError
from fluxguide.rewards.inputs import DEFAULT_RANGE_TOLERANCE, check_images, check_prompts, check_reward_output


class NotDifferentiableError(UserError, RuntimeError):
    """A gradient was asked of a reward that has none (e.g. a programmatic verifier)."""


class RewardModel(nn.Module, ABC):
    """Base class of rewards.

    Attributes:
        differentiable: whether the reward is a differentiable function of the pixels, so a
            reward-gradient algorithm may backpropagate through it. Non-differentiable rewards are
            for PPO (or any algorithm that only needs reward values).
        range_tolerance: how far outside [0, 1] a pixel may be before :meth:`forward` raises.
        last_components: named per-image values of the last call, detached (e.g. the verifier's
            per-attribute scores, or the parts of a weighted sum), for logging each under its own name.
            Empty for rewards without components.
    """

    differentiable: bool = True
    range_tolerance: float = DEFAULT_RANGE_TOLERANCE

    def __init__(self) -> None:
        super().__init__()
        self.last_components: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score a batch of images against their prompts.

        Args:
            images: float tensor ``(B, 3, H, W)`` in [0, 1].
            prompts: ``B`` strings, one per image.

        Returns:
            float32 tensor ``(B,)``, higher is better.
        """
        check_images(images, tolerance=self.range_tolerance)
        check_prompts(prompts, images.shape[0])
        values = self.score(images, list(prompts))
        return check_reward_output(values, images.shape[0], source=self.describe())

    def describe(self) -> str:
        """How error messages name this reward."""
        return type(self).__name__

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Compute the reward on validated inputs; returns ``(B,)``."""


def require_differentiable(reward: nn.Module) -> None:
    """Raise :class:`NotDifferentiableError` unless ``reward`` can give gradients with respect to pixels.

    A module without a ``differentiable`` attribute counts as differentiable (any ``nn.Module`` of
    pixels is, unless it says otherwise).
    """
    if not getattr(reward, "differentiable", True):
        parts = getattr(reward, "nondifferentiable_parts", None)
        detail = f" (its parts {parts()} are not)" if callable(parts) else ""
        raise NotDifferentiableError(
            f"{type(reward).__name__} is not differentiable with respect to the pixels{detail}, so "
            f"reward-gradient methods cannot backpropagate through it; use PPO instead (it only needs reward "
            f"values)."
        )


def reward_with_grad(reward: nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Evaluate ``reward`` with gradients on, after checking that it is differentiable.

    Raises:
        NotDifferentiableError: the reward is not differentiable (use PPO for it).
    """
    require_differentiable(reward)
    with torch.enable_grad():
        return reward(images, prompts)
