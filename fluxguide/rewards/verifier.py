"""A world's exact verifier as a reward: any ``verify(images, prompts)`` with a pass/fail and attribute scores.

A backbone with a verifier (:attr:`fluxguide.backbones.Backbone.verifier`) hands it to the rewards that take
``verify`` (``Backbone.reward_kwargs``), so ``"verifier-attributes"`` scores any world that has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fluxguide.rewards.base import RewardModel


class VerifierReward(RewardModel):
    """An exact verifier as a reward: ``pass_weight * passed + partial_credit * mean(attribute scores)``.

    Not differentiable (it thresholds the image), so it is a PPO reward and the held-out metric that tells
    real improvement from reward hacking. After each call ``last_components`` holds the verifier's
    per-attribute scores (in the shapes world ``count``, ``kind``, ``color``, ``position``).

    With ``partial_credit = c > 0`` an image that gets three of four attributes right scores above one that gets
    none, so a group of samples of one prompt that all fail still ranks them (the all-or-nothing pass is rare
    early in training, and PPO's per-prompt advantages are zero for groups that all score the same);
    ``pass_weight = 0`` scores the attributes alone.

    Args:
        verify: ``verify(images, prompts)`` returning an object with ``.passed`` (bool ``(B,)``) and ``.scores``
            (``{name: (B,)}``).
        partial_credit: weight ``c`` of the mean attribute score (0: pass/fail only).
        pass_weight: weight of the pass/fail (1; 0: the attribute scores alone).
    """

    differentiable = False

    def __init__(
        self, verify: Callable[[torch.Tensor, list[str]], Any], partial_credit: float = 0.0, pass_weight: float = 1.0
    ) -> None:
        super().__init__()
        if not callable(verify):
            raise TypeError(f"verify must be a verifier verify(images, prompts), got {type(verify).__name__}")
        for name, value in (("partial_credit", partial_credit), ("pass_weight", pass_weight)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if pass_weight == 0 and partial_credit == 0:
            raise ValueError("pass_weight and partial_credit are both 0: the reward would score nothing")
        self.verify = verify
        self.partial_credit = float(partial_credit)
        self.pass_weight = float(pass_weight)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            result = self.verify(images.detach(), prompts)
        self.last_components = {
            name: torch.as_tensor(values).detach().float().to(images.device)
            for name, values in result.scores.items()
        }
        reward = None
        if self.pass_weight > 0:
            reward = torch.as_tensor(result.passed).float().to(images.device)
            reward = reward if self.pass_weight == 1 else self.pass_weight * reward
        if self.partial_credit > 0:
            credit = self.partial_credit * torch.stack(list(self.last_components.values())).mean(0)
            reward = credit if reward is None else reward + credit
        assert reward is not None  # __init__ refuses two zero weights
        return reward
