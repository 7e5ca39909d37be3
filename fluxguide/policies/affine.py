"""A learned affine schedule: ``correction = a(t) * img + b(t) * pred``, one coefficient pair per image channel.

The Euler sampler moves ``img`` along ``pred``; rescaling those two vectors at each time is how learned
("bespoke") flow solvers reshape a sampler with a handful of numbers (Shaul et al. 2023, "Bespoke Solvers for
Generative Flow Models"). As a guidance policy it has ``2 * channels`` outputs per time (from a zero-initialised
linear map of the timestep embedding), reads neither the text nor any position, and so generalises to any
prompt by construction. With so few parameters a policy gradient sums the evidence of every action dimension
into each of them, which is what a sparse, non-differentiable reward needs (README, PPO rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fluxguide.policies.base import BaseGuidanceModel, CheckedNetwork, GuidanceInputs
from fluxguide.policies.coarse import expand_coarse
from fluxguide.policies.embeddings import timestep_embedding

if TYPE_CHECKING:
    from fluxguide.backbones.base import Backbone


class AffineGuidance(CheckedNetwork, BaseGuidanceModel, architecture="affine"):
    """``correction = a(t) * img + b(t) * pred`` with ``a, b`` per image channel (see the module docstring).

    Text-blind by construction (:attr:`text_aware` is ``False``): it reads neither ``txt`` nor ``vec``.

    Args:
        latent_channels: token width ``C`` (48 in the shapes world, 64 in Flux).
        channels: image (or latent) channels per token (3 in the shapes world, 16 in Flux); each owns
            ``C / channels`` consecutive entries of a token (:func:`fluxguide.sampling.packing.pack`).
        time_dim: size of the sinusoidal timestep embedding the coefficients are read from.
        device, dtype: where to create the parameters.
    """

    text_aware = False

    def __init__(
        self,
        latent_channels: int,
        channels: int,
        time_dim: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels < 1 or latent_channels % channels:
            raise ValueError(
                f"latent_channels={latent_channels} must be a multiple of channels={channels} "
                "(C = channels * patch * patch)"
            )
        if time_dim < 2:
            raise ValueError(f"time_dim must be >= 2, got {time_dim}")
        self.register_config(latent_channels=latent_channels, channels=channels, time_dim=time_dim)
        self.latent_channels, self.channels, self.time_dim = latent_channels, channels, time_dim
        self.coefficients = nn.Linear(time_dim, 2 * channels, device=device, dtype=dtype)
        nn.init.zeros_(self.coefficients.weight)  # zero output: the untrained policy is the base sampler
        nn.init.zeros_(self.coefficients.bias)

    def coefficients_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """The ``2 * channels`` coefficients ``(a_1 .. a_channels, b_1 .. b_channels)`` at times ``(B,)``."""
        emb = timestep_embedding(timestep, self.time_dim).to(self.coefficients.weight.dtype)
        return self.coefficients(emb)

    def basis(self, img: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """``(..., 2 * channels, seq, C)``: ``img`` and ``pred`` restricted to each channel's entries, in the
        order of :meth:`coefficients_at`; the correction is the coefficients' combination of these vectors."""
        width = img.shape[-1]
        masks = expand_coarse(torch.eye(self.channels, dtype=img.dtype, device=img.device), width)  # (ch, C)
        parts = [x.unsqueeze(-3) * masks[:, None, :] for x in (img, pred)]  # (..., ch, seq, C) each
        return torch.cat(parts, dim=-3)

    def resolve_grid(self, seq: int) -> tuple[int, int]:
        """``(1, seq)``: the schedule acts on each token alone and reads no positions, so any token count (a
        non-square image's grid too) is valid."""
        return (1, seq)

    @classmethod
    def for_backbone(cls, backbone: Backbone, *, hidden_dim: int, device: torch.device | str) -> AffineGuidance:
        """``build_policy("affine", backbone)``: per image channel of the backbone; ``hidden_dim`` is the size of the
        timestep embedding (the other sizes are unused)."""
        return cls(backbone.latent_channels, backbone.image_channels, time_dim=hidden_dim, device=device)

    def compute(
        self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> torch.Tensor:
        a, b = self.coefficients_at(inputs.timestep).unflatten(-1, (2, self.channels)).unbind(1)  # (B, ch) each
        width = img.shape[-1]
        a, b = (expand_coarse(x[:, None, :], width).to(img.dtype) for x in (a, b))  # (B, 1, C)
        return a * img + b * pred
