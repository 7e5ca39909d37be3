"""The reward an env scores its final images with: a module, a registry name / spec, or a callable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fluxguide.backbones.base import Backbone

RewardLike = nn.Module | str | Callable[[torch.Tensor, list[str]], torch.Tensor]


def build_reward(reward: RewardLike, backbone: Backbone, reward_kwargs: Mapping[str, Any] | None) -> nn.Module:
    """A reward module from a module, a registry name (``make_reward``) or a callable ``fn(images, prompts)``.

    A registry name also gets what the backbone says it needs (:meth:`Backbone.reward_kwargs`, e.g. a world's
    own rewards share its loaded models) unless ``reward_kwargs`` gives it.
    """
    kwargs = dict(reward_kwargs or {})
    if isinstance(reward, str):
        from fluxguide.rewards import make_reward

        return make_reward(reward, **{**backbone.reward_kwargs(reward), **kwargs})
    if kwargs:
        raise ValueError(f"reward_kwargs {sorted(kwargs)} are only used with a reward registry name, not a built reward")
    if isinstance(reward, nn.Module):
        return reward
    if callable(reward):
        from fluxguide.rewards import CallableReward

        return CallableReward(reward)
    raise TypeError(
        f"reward must be a reward module, a registry name or a callable fn(images, prompts) -> (B,), "
        f"got {type(reward).__name__}"
    )
