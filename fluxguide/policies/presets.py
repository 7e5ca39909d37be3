"""Guidance networks sized for a backbone, by architecture name (what the experiment scripts build)."""

from __future__ import annotations

from typing import Literal

import torch

from fluxguide.backbones.base import Backbone
from fluxguide.policies.attention import AttentionGuidanceModel
from fluxguide.policies.base import BaseGuidanceModel
from fluxguide.policies.conv import ConvGuidanceModel
from fluxguide.policies.mlp import MLPGuidanceModel

PolicyName = Literal["mlp", "attention", "conv"]


def latent_grid(backbone: Backbone) -> tuple[int, int]:
    """The ``(rows, cols)`` token grid of the backbone's packed latents (read off its Flux position ids)."""
    ids = backbone.encode([""]).img_ids
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def pixel_patch(backbone: Backbone) -> int:
    """Side of the spatial patch packed into one token: 4 pixels in the shapes world, 2 latents in Flux."""
    from fluxguide.backbones.shapes import ShapesWorld
    from fluxguide.backbones.shapes.world import PATCH

    return PATCH if isinstance(backbone, ShapesWorld) else 2


def build_policy(
    name: PolicyName,
    backbone: Backbone,
    *,
    hidden_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    device: torch.device | str | None = None,
) -> BaseGuidanceModel:
    """A fresh guidance network of architecture ``name`` whose shapes match ``backbone``'s observations.

    Args:
        name: ``"mlp"`` (per token), ``"attention"`` (tokens attend to each other and to the text tokens)
            or ``"conv"`` (on the unpacked spatial grid). All know each token's position.
        backbone: the base model whose latents, text features and pooled embedding the policy reads.
        hidden_dim: width; num_layers: MLP layers / transformer blocks / conv blocks; num_heads: attention
            heads.
        device: where to create it (default: the backbone's device).
    """
    cond = backbone.encode([""])
    kw = {"vec_dim": cond.vec.shape[-1], "grid_size": latent_grid(backbone), "device": device or backbone.device}
    if name == "mlp":
        return MLPGuidanceModel(latent_channels=backbone.latent_channels, hidden_dim=hidden_dim,
                                num_layers=num_layers, **kw)
    if name == "attention":
        return AttentionGuidanceModel(hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                                      latent_channels=backbone.latent_channels, txt_dim=cond.txt.shape[-1],
                                      mlp_ratio=2.0, **kw)
    if name == "conv":
        patch = pixel_patch(backbone)
        return ConvGuidanceModel(in_channels=backbone.latent_channels // patch**2, hidden_channels=hidden_dim,
                                 num_blocks=num_layers, patch_size=patch, **kw)
    raise ValueError(f"unknown policy architecture {name!r}: choose one of {PolicyName.__args__}")
