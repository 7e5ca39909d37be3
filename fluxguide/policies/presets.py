"""Guidance networks sized for a backbone, by architecture name (what the experiment scripts build)."""

from __future__ import annotations

from typing import Literal

import torch

from fluxguide.backbones.base import Backbone
from fluxguide.policies.affine import AffineGuidance
from fluxguide.policies.attention import AttentionGuidanceModel
from fluxguide.policies.base import BaseGuidanceModel
from fluxguide.policies.coarse import CoarseGuidance
from fluxguide.policies.composite import TimestepRangeGuidance
from fluxguide.policies.conv import ConvGuidanceModel
from fluxguide.policies.mlp import MLPGuidanceModel

PolicyName = Literal["mlp", "attention", "conv", "affine"]


def latent_grid(backbone: Backbone) -> tuple[int, int]:
    """The ``(rows, cols)`` token grid of the backbone's packed latents (read off its Flux position ids)."""
    ids = backbone.encode([""]).img_ids
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def pixel_patch(backbone: Backbone) -> int:
    """Side of the spatial patch packed into one token: 4 pixels in the shapes world, 2 latents in Flux."""
    from fluxguide.backbones.shapes import ShapesWorld
    from fluxguide.backbones.shapes.world import PATCH

    return PATCH if isinstance(backbone, ShapesWorld) else 2


def image_channels(backbone: Backbone) -> int:
    """Image (or latent) channels per token: 3 in the shapes world, 16 in Flux (the coarse channels)."""
    return backbone.latent_channels // pixel_patch(backbone) ** 2


def build_policy(
    name: PolicyName,
    backbone: Backbone,
    *,
    hidden_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    min_t: float = 0.0,
    text_conditioning: bool = True,
    coarse: bool = False,
    device: torch.device | str | None = None,
) -> BaseGuidanceModel:
    """A fresh guidance network of architecture ``name`` whose shapes match ``backbone``'s observations.

    Args:
        name: ``"mlp"`` (per token), ``"attention"`` (tokens attend to each other and to the text tokens),
            ``"conv"`` (on the unpacked spatial grid), all of which know each token's position, or ``"affine"``
            (:class:`AffineGuidance`: a learned per-time, per-channel ``a(t) img + b(t) pred``, a few dozen
            parameters; ``hidden_dim`` is its timestep-embedding size, the other sizes are unused).
        backbone: the base model whose latents, text features and pooled embedding the policy reads.
        hidden_dim: width; num_layers: MLP layers / transformer blocks / conv blocks; num_heads: attention
            heads.
        min_t: guide only at times ``t >= min_t`` (1 = noise) and output zero later: the network is wrapped in a
            :class:`TimestepRangeGuidance` (saved with it). Early steps decide the layout and the kind of each
            object; a correction there is carried to the image by the base model's own later steps, which keep
            it on the data manifold, while a late correction can paint pixels that fool a reward model.
        text_conditioning: ``False``: a text-blind attention network (sees ``img``, ``pred`` and ``t`` only), the
            right student for classifier-free guidance (see :class:`AttentionGuidanceModel`).
        coarse: project the correction onto coarse corrections, one value per token and image channel
            (:class:`CoarseGuidance`, saved with it): the action space of PPO's coarse exploration.
        device: where to create it (default: the backbone's device).
    """
    if not text_conditioning and name != "attention":
        raise ValueError(f"text_conditioning=False is implemented by the 'attention' policy, not {name!r}")
    if not 0.0 <= min_t < 1.0:
        raise ValueError(f"min_t must be in [0, 1) (guide at times t >= min_t; 0 guides every step), got {min_t}")
    model = _build_network(name, backbone, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
                           text_conditioning=text_conditioning, device=device)
    if coarse:
        model = CoarseGuidance(model, image_channels(backbone))
    return TimestepRangeGuidance([((min_t, 1.0), model)]) if min_t > 0 else model


def _build_network(
    name: PolicyName, backbone: Backbone, *, hidden_dim: int, num_layers: int, num_heads: int,
    text_conditioning: bool, device: torch.device | str | None,
) -> BaseGuidanceModel:
    cond = backbone.encode([""])
    kw = {"vec_dim": cond.vec.shape[-1], "grid_size": latent_grid(backbone), "device": device or backbone.device}
    if name == "mlp":
        return MLPGuidanceModel(latent_channels=backbone.latent_channels, hidden_dim=hidden_dim,
                                num_layers=num_layers, **kw)
    if name == "attention":
        return AttentionGuidanceModel(hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                                      latent_channels=backbone.latent_channels, txt_dim=cond.txt.shape[-1],
                                      mlp_ratio=2.0, text_conditioning=text_conditioning, **kw)
    if name == "affine":
        return AffineGuidance(backbone.latent_channels, image_channels(backbone), time_dim=hidden_dim,
                              device=device or backbone.device)
    if name == "conv":
        patch = pixel_patch(backbone)
        return ConvGuidanceModel(in_channels=backbone.latent_channels // patch**2, hidden_channels=hidden_dim,
                                 num_blocks=num_layers, patch_size=patch, **kw)
    raise ValueError(f"unknown policy architecture {name!r}: choose one of {PolicyName.__args__}")
