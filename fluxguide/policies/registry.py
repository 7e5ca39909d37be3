"""Guidance networks sized for a backbone, by architecture name (what the experiment scripts build)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fluxguide.backbones.base import Backbone
from fluxguide.plugins import Registry, call_with_options
from fluxguide.policies.affine import AffineGuidance
from fluxguide.policies.attention import AttentionGuidanceModel
from fluxguide.policies.base import BaseGuidanceModel
from fluxguide.policies.coarse import CoarseGuidance
from fluxguide.policies.composite import TimestepRangeGuidance
from fluxguide.policies.conv import ConvGuidanceModel
from fluxguide.policies.mlp import MLPGuidanceModel

PolicyName = str
"""``"mlp"``, ``"attention"``, ``"conv"``, ``"affine"``, an entry-point name or a spec ``"package.module:factory"``."""


def latent_grid(backbone: Backbone) -> tuple[int, int]:
    """The ``(rows, cols)`` token grid of the backbone's packed latents (read off its Flux position ids)."""
    ids = backbone.encode([""]).img_ids
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def pixel_patch(backbone: Backbone) -> int:
    """Side of the spatial patch packed into one token (:attr:`Backbone.pixel_patch`: 2 latents in Flux)."""
    return backbone.pixel_patch


def image_channels(backbone: Backbone) -> int:
    """Image (or latent) channels per token (:attr:`Backbone.image_channels`: 16 in Flux, the coarse channels)."""
    return backbone.image_channels


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
    if not text_conditioning and name not in ("attention", "affine"):  # the affine schedule never reads the text
        raise ValueError(f"text_conditioning=False is implemented by the 'attention' policy, not {name!r}")
    if not 0.0 <= min_t < 1.0:
        raise ValueError(f"min_t must be in [0, 1) (guide at times t >= min_t; 0 guides every step), got {min_t}")
    model = _build_network(name, backbone, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
                           text_conditioning=text_conditioning, device=device)
    if coarse:
        model = CoarseGuidance(model, image_channels(backbone))
    return TimestepRangeGuidance([((min_t, 1.0), model)]) if min_t > 0 else model


PolicyFactory = Callable[..., BaseGuidanceModel]
POLICIES: Registry[PolicyFactory] = Registry("policy architecture", "fluxguide.policies")
"""Every architecture name: the built-ins below, an installed package's ``fluxguide.policies`` entry point, or a
spec ``"package.module:factory"``. A factory is called as ``factory(backbone, **sizes)`` and gets those of
``hidden_dim``, ``num_layers``, ``num_heads``, ``text_conditioning``, ``vec_dim``, ``txt_dim``, ``grid_size``
and ``device`` it declares (all of them if it takes ``**kwargs``)."""


@POLICIES.register("mlp")
def _mlp(backbone: Backbone, *, hidden_dim: int, num_layers: int, vec_dim: int, grid_size: tuple[int, int],
         device: torch.device | str) -> BaseGuidanceModel:
    return MLPGuidanceModel(latent_channels=backbone.latent_channels, hidden_dim=hidden_dim, num_layers=num_layers,
                            vec_dim=vec_dim, grid_size=grid_size, device=device)


@POLICIES.register("attention")
def _attention(backbone: Backbone, *, hidden_dim: int, num_layers: int, num_heads: int, text_conditioning: bool,
               vec_dim: int, txt_dim: int, grid_size: tuple[int, int], device: torch.device | str) -> BaseGuidanceModel:
    return AttentionGuidanceModel(hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                                  latent_channels=backbone.latent_channels, txt_dim=txt_dim, mlp_ratio=2.0,
                                  text_conditioning=text_conditioning, vec_dim=vec_dim, grid_size=grid_size,
                                  device=device)


@POLICIES.register("affine")
def _affine(backbone: Backbone, *, hidden_dim: int, device: torch.device | str) -> BaseGuidanceModel:
    return AffineGuidance(backbone.latent_channels, backbone.image_channels, time_dim=hidden_dim, device=device)


@POLICIES.register("conv")
def _conv(backbone: Backbone, *, hidden_dim: int, num_layers: int, vec_dim: int, grid_size: tuple[int, int],
          device: torch.device | str) -> BaseGuidanceModel:
    return ConvGuidanceModel(in_channels=backbone.image_channels, hidden_channels=hidden_dim, num_blocks=num_layers,
                             patch_size=backbone.pixel_patch, vec_dim=vec_dim, grid_size=grid_size, device=device)


def _build_network(
    name: PolicyName, backbone: Backbone, *, hidden_dim: int, num_layers: int, num_heads: int,
    text_conditioning: bool, device: torch.device | str | None,
) -> BaseGuidanceModel:
    factory = POLICIES.get(name)
    cond = backbone.encode([""])
    options = {"hidden_dim": hidden_dim, "num_layers": num_layers, "num_heads": num_heads,
               "text_conditioning": text_conditioning, "vec_dim": cond.vec.shape[-1], "txt_dim": cond.txt.shape[-1],
               "grid_size": latent_grid(backbone), "device": device or backbone.device}
    model = call_with_options(factory, backbone, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"policy {name!r} built a {type(model).__name__}, not a guidance nn.Module")
    return model
