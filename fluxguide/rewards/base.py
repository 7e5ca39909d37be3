"""The reward contract: ``forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` plus ``differentiable``.

Subclasses implement :meth:`RewardModel.score`; :meth:`RewardModel.forward` validates the inputs and the
output around it, so every reward rejects bad input the same way. A reward that is not a :class:`RewardModel`
(any ``nn.Module`` or function a plug-in returns) is checked where it enters an algorithm or an evaluation:
they all call it through :func:`call_reward`. Rewards never decide on ``no_grad``: a reward-gradient
algorithm calls them with gradients on, PPO calls them under ``torch.no_grad()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

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
        return check_reward_output(values, images.shape[0], source=describe_reward(self))

    def describe(self) -> str:
        """How error messages name this reward."""
        return type(self).__name__

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Compute the reward on validated inputs; returns ``(B,)``."""


#: The attribute :func:`fluxguide.rewards.make_reward` records a reward's registry name or spec in.
REGISTRY_NAME_ATTR = "registry_name"


def describe_reward(reward: object) -> str:
    """How messages name a reward: its registry name or spec (recorded by ``make_reward``) and what it is
    (:meth:`RewardModel.describe`, a function's or a module's class name), e.g. ``reward 'shapes-clip'
    (CLIPScore)``."""
    describe = getattr(reward, "describe", None)
    what = describe() if callable(describe) else (
        getattr(reward, "__qualname__", None) if not isinstance(reward, nn.Module) else None) or type(reward).__name__
    name = getattr(reward, REGISTRY_NAME_ATTR, None)
    return f"reward {name!r} ({what})" if isinstance(name, str) and name else what


def call_reward(reward: Callable[[torch.Tensor, list[str]], torch.Tensor], images: torch.Tensor,
                prompts: list[str]) -> torch.Tensor:
    """``reward(images, prompts)``, checked as every algorithm and evaluation takes it: one finite float per
    image (float32 ``(B,)``), whatever the reward is.

    Raises:
        fluxguide.rewards.inputs.RewardOutputError: naming the reward (:func:`describe_reward`) and what is
            wrong: not a floating-point tensor, the wrong shape, or NaN / inf values (before any clamp or mean
            could hide them).
    """
    return check_reward_output(reward(images, prompts), images.shape[0], source=describe_reward(reward))


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
        return call_reward(reward, images, prompts)


def score_in_batches(reward: Callable[[torch.Tensor, list[str]], torch.Tensor], images: torch.Tensor,
                     prompts: Sequence[str], *, batch_size: int = 64,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``reward`` of ``images`` against ``prompts``, ``batch_size`` images per call on ``device`` (default: where
    the images are), each call checked by :func:`call_reward`; the values as one float tensor ``(B,)`` on the CPU."""
    return torch.cat([call_reward(reward, images[i: i + batch_size].to(device or images.device),
                                  list(prompts[i: i + batch_size])).float().cpu()
                      for i in range(0, len(prompts), batch_size)])
