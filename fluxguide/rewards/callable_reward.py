"""Any user callable ``fn(images, prompts) -> (B,)`` as a reward (the seed's ``reward_fn``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fluxguide.rewards.base import RewardModel


class CallableReward(RewardModel):
    """Wrap ``fn(images, prompts) -> (B,)`` so it follows the reward contract.

    Inputs are validated before ``fn`` sees them and its output must be a tensor of shape ``(B,)``.
    If ``fn`` is an ``nn.Module`` it is registered as a submodule (so ``.to()`` moves it).

    Args:
        fn: the reward function.
        differentiable: whether ``fn`` is differentiable with respect to the pixels. Say ``False`` for
            anything that leaves torch (numpy, PIL, a remote scorer) so reward-gradient methods refuse it.
        name: a name for error messages (default: ``fn``'s name).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
        *,
        differentiable: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(images, prompts) -> (B,), got {type(fn).__name__}.")
        self.fn = fn  # an nn.Module is registered as a submodule by nn.Module.__setattr__
        self.differentiable = bool(differentiable)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def describe(self) -> str:
        return f"reward function {self.name!r}"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images, prompts)

    def extra_repr(self) -> str:
        fn_repr = "" if isinstance(self.fn, nn.Module) else f"fn={self.name}, "
        return f"{fn_repr}differentiable={self.differentiable}"
