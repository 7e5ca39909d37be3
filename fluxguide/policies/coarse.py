"""Coarse corrections: one number per token and image channel, constant over the pixels the token packs.

A packed token holds ``channels`` image (or latent) channels times a ``p x p`` patch, ``C = channels * p * p``
in einops order ``(c ph pw)`` (:func:`fluxguide.sampling.packing.pack`). A *coarse* correction is constant
over each channel's ``p * p`` entries of a token: 3 x 64 = 192 numbers per step in the shapes world instead of
3,072, 16 per token in Flux instead of 64.

Why: a policy-gradient estimate correlates the advantage with the exploration noise of every action
dimension, so its variance grows with the number of dimensions the noise spans, while the reward of an
image depends mostly on its coarse layout early in sampling. In the shapes world classifier-free guidance
projected this way onto its first steps keeps most of its gain (see docs/guide.md). A coarse policy explores,
and corrects, only in that low-dimensional subspace; :class:`fluxguide.policies.distributions.CoarseNormal`
is its exact Gaussian there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fluxguide.policies.base import BaseGuidanceModel
from fluxguide.policies.composite import CompositeGuidance, GuidancePart


def _check_channels(x: torch.Tensor, channels: int) -> int:
    if channels < 1 or x.shape[-1] % channels:
        raise ValueError(
            f"a coarse correction needs the token width {x.shape[-1]} to be a multiple of channels={channels} "
            f"(C = channels * patch * patch): pass the backbone's image/latent channel count "
            f"(3 in the shapes world, 16 in Flux)"
        )
    return x.shape[-1] // channels


def coarse_coordinates(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(..., seq, C) -> (..., seq, channels)``: the mean of each channel over the token's packed pixels."""
    group = _check_channels(x, channels)
    return x.unflatten(-1, (channels, group)).mean(-1)


def expand_coarse(z: torch.Tensor, width: int) -> torch.Tensor:
    """``(..., seq, channels) -> (..., seq, width)``: repeat each channel's value over its packed pixels."""
    channels = z.shape[-1]
    if width % channels:
        raise ValueError(f"token width {width} is not a multiple of the {channels} coarse channels")
    return z.unsqueeze(-1).expand(*z.shape, width // channels).flatten(-2)


def project_coarse(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The orthogonal projection of ``(..., seq, C)`` onto coarse corrections."""
    return expand_coarse(coarse_coordinates(x, channels), x.shape[-1])


class CoarseGuidance(CompositeGuidance):
    """A guidance model whose correction is projected onto coarse corrections (see the module docstring).

    Args:
        model: the wrapped guidance model (its zero output stays zero).
        channels: image (or latent) channels per token: 3 in the shapes world, 16 in Flux.
    """

    combine = "coarse"

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"channels must be a positive channel count, got {channels}")
        self.model = model
        self.channels = int(channels)

    def parts(self) -> list[GuidancePart]:
        return [GuidancePart(self.model)]

    def config_entries(self, child: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
        return {"channels": self.channels, "model": child(self.model)}

    @classmethod
    def constructor_arguments(
        cls, config: dict[str, Any], build: Callable[[dict[str, Any]], BaseGuidanceModel]
    ) -> dict[str, Any]:
        return {"model": build(config["model"]), "channels": config["channels"]}

    def project(self, correction: torch.Tensor) -> torch.Tensor:
        return project_coarse(correction, self.channels)
