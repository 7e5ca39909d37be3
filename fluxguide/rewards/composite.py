"""Weighted sums of rewards, for multi-objective training (the seed's "Combine Objectives").

``WeightedSum({"clip": (clip_reward, 1.0), "aesthetic": (aesthetic_reward, 0.1)})`` returns
``sum_i w_i * r_i(images, prompts)`` and keeps each part's unweighted values in ``last_components`` under
its own name, so a training script logs every objective separately (``train/reward/clip``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fluxguide.rewards.base import RewardModel, call_reward


class WeightedSum(RewardModel):
    """A weighted sum of named rewards.

    Args:
        parts: ``{name: (reward, weight)}``; a bare reward counts with weight 1. Each reward is a
            :class:`RewardModel` or any ``nn.Module`` with the reward contract.

    Attributes:
        weights: ``{name: weight}``.
        last_components: after a call, ``{name: values}`` of each part (unweighted, detached ``(B,)``),
            plus ``"{name}/{component}"`` for the parts' own components (e.g. ``"verifier/count"``).
    """

    def __init__(self, parts: Mapping[str, tuple[nn.Module, float] | nn.Module]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("WeightedSum needs at least one part, e.g. {'clip': (reward, 1.0)}.")
        rewards: dict[str, nn.Module] = {}
        self.weights: dict[str, float] = {}
        for name, spec in parts.items():
            if not isinstance(name, str) or not name or "/" in name or "." in name:
                raise ValueError(f"part names must be non-empty strings without '/' or '.', got {name!r}.")
            reward, weight = (spec, 1.0) if isinstance(spec, nn.Module) else _unpack(name, spec)
            rewards[name] = reward
            self.weights[name] = weight
        self.parts = nn.ModuleDict(rewards)

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        """True only if every part is differentiable."""
        return not self.nondifferentiable_parts()

    def nondifferentiable_parts(self) -> list[str]:
        """Names of the parts that are not differentiable."""
        return [name for name, r in self.parts.items() if not getattr(r, "differentiable", True)]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for name, reward in self.parts.items():
            values = call_reward(reward, images, prompts)
            components[name] = values.detach()
            for sub, sub_values in getattr(reward, "last_components", {}).items():
                components[f"{name}/{sub}"] = sub_values.detach()
            total = total + self.weights[name] * values.to(device=total.device, dtype=total.dtype)
        self.last_components = components
        return total

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def _unpack(name: str, spec: object) -> tuple[nn.Module, float]:
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], nn.Module):
        reward, weight = spec
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight of part {name!r} must be a number, got {weight!r}.")
        return reward, float(weight)
    raise TypeError(
        f"part {name!r} must be a reward module or a (reward, weight) tuple, got {type(spec).__name__} "
        f"{spec!r:.80}; to build parts by registry name use make_reward('sum', parts={{...}})."
    )
