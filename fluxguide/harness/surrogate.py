"""The learned-reward options of ``train_reward_gradient.py`` (``--surrogate`` and its settings) and the algorithm
they build: reward gradient, or, with ``--surrogate``, reward gradient through a surrogate of a black-box reward
(:mod:`fluxguide.algos.learned_reward`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fluxguide.algos.learned_reward import LearnedRewardGradient, SurrogateFitConfig
from fluxguide.algos.reward_gradient import RewardGradient, RewardGradientConfig
from fluxguide.harness.config import ConfigError, check_float, check_int
from fluxguide.rewards.clip_score import CLIPScore
from fluxguide.rewards.learned import LearnedReward

__all__ = ["SurrogateConfig"]


@dataclass
class SurrogateConfig:
    """Training on a black-box reward through a learned surrogate of it."""

    surrogate: str | None = None
    """train on --reward as a black box (only its scores are used): fit a reward model on the frozen embeddings of
    this CLIP reward (e.g. 'shapes-clip') to --reward's scores of the policy's own images, online, and backpropagate
    through it (fluxguide.algos.learned_reward; --reward-target is then in --reward's units); None: backpropagate
    through --reward itself"""
    surrogate_hidden: int = 256
    """width of the surrogate's MLP head (--surrogate)"""
    surrogate_lr: float = 1e-3
    """learning rate of the surrogate's head (--surrogate)"""
    surrogate_fit_steps: int = 32
    """Adam steps on the surrogate's memory of scored images per update (--surrogate)"""
    surrogate_memory: int = 10240
    """scored images the surrogate keeps for fitting, the newest (--surrogate)"""
    surrogate_warmup: int = 256
    """images of the starting policy scored before the policy's first step: the first updates only sample, score and
    fit the surrogate (they count as samples; --surrogate)"""
    surrogate_ramp: int = 512
    """images over which the policy's learning rate then rises linearly from 0 to --lr (--surrogate)"""

    def validate(self) -> None:
        check_int("surrogate_hidden", self.surrogate_hidden)
        check_float("surrogate_lr", self.surrogate_lr)
        check_int("surrogate_fit_steps", self.surrogate_fit_steps, minimum=0)
        check_int("surrogate_memory", self.surrogate_memory)
        check_int("surrogate_warmup", self.surrogate_warmup, minimum=0)
        check_int("surrogate_ramp", self.surrogate_ramp, minimum=0)

    def algorithm(self, backbone: Any, policy: nn.Module, reward: nn.Module, optimizer: torch.optim.Optimizer,
                  config: RewardGradientConfig, *, seed: int, one_step: bool = False,
                  **options: Any) -> RewardGradient:
        """Without ``--surrogate``, :class:`RewardGradient` on the differentiable ``reward``; with it,
        :class:`LearnedRewardGradient` on ``reward`` as a black box (only called), its surrogate on the CLIP reward
        ``self.surrogate`` of ``backbone``. ``options`` (``decode``, ``reference``) go to either."""
        from fluxguide.backbones.registry import build_reward

        if one_step and self.surrogate is not None:
            raise ConfigError("--one-step with --surrogate: the learned reward trains through the full trajectory; "
                              "drop one of them")
        if self.surrogate is None:
            return RewardGradient(backbone, policy, reward, optimizer, config, one_step=one_step, **options)
        clip = build_reward(self.surrogate, backbone, seed=seed)
        if not isinstance(clip, CLIPScore):
            raise ConfigError(f"--surrogate {self.surrogate!r} is a {type(clip).__name__}, not a CLIP reward: the "
                              "surrogate reads a CLIP's embeddings; name one, e.g. --surrogate shapes-clip")
        surrogate = LearnedReward(clip, hidden=self.surrogate_hidden, capacity=self.surrogate_memory)
        return LearnedRewardGradient(
            backbone, policy, reward, surrogate, optimizer, config,
            surrogate_optimizer=torch.optim.Adam(surrogate.head.parameters(), lr=self.surrogate_lr),
            fit=SurrogateFitConfig(steps=self.surrogate_fit_steps, warmup=self.surrogate_warmup,
                                   ramp=self.surrogate_ramp), **options)
