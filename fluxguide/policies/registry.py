"""Guidance networks sized for a backbone, by architecture name (what the experiment scripts build), and the
checks that a network fits a backbone and can be saved, made before any training or sampling."""

from __future__ import annotations

import inspect
import json

import torch
from torch import nn

from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.errors import UserError
from fluxguide.plugins import call_with_options, signature_mismatch
from fluxguide.policies import affine, attention, conv, mlp  # noqa: F401  (the built-ins declare their names)
from fluxguide.policies.architectures import ARCHITECTURES, ArchitectureRegistry, PolicyFactory
from fluxguide.policies.base import BaseGuidanceModel, GuidanceNetwork
from fluxguide.policies.coarse import CoarseGuidance
from fluxguide.policies.composite import TimestepRangeGuidance

PolicyName = str
"""``"mlp"``, ``"attention"``, ``"conv"``, ``"affine"``, an entry-point name or a spec ``"package.module:factory"``."""


class PolicyPluginError(UserError, TypeError):
    """A policy plug-in built something a run cannot save and reload: not a :class:`BaseGuidanceModel`, or one
    whose config does not rebuild it."""


class PolicyOptionError(UserError, ValueError):
    """Options ``build_policy`` cannot honour: ``min_t`` outside [0, 1), or ``text_conditioning=False`` for an
    architecture whose networks read the prompt."""


class PolicyMismatchError(UserError, ValueError):
    """A guidance network built for other observation sizes than the backbone's (another base model)."""


#: How a plug-in architecture becomes one a run can save (docs/guide.md, "Plug in a new guidance architecture").
GUIDANCE_CONTRACT = ("subclass fluxguide.policies.BaseGuidanceModel, call self.register_config(**constructor_args) "
                     "with JSON values in __init__, and return an instance from the factory (docs/guide.md, 'Plug in "
                     "a new guidance architecture')")


def latent_grid(backbone: Backbone) -> tuple[int, int]:
    """The ``(rows, cols)`` token grid of the backbone's packed latents (read off its Flux position ids)."""
    return _grid_of(backbone.encode([""]))


def _grid_of(cond: Conditioning) -> tuple[int, int]:
    ids = cond.img_ids
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
        text_conditioning: ``False``: a text-blind network (sees ``img``, ``pred`` and ``t`` only), the right student
            for classifier-free guidance (see :class:`~fluxguide.policies.AttentionGuidanceModel`). The factory gets
            the option if it takes it; the network it builds must then declare ``text_aware`` False (the attention
            network does with the option, the affine schedule always), else :class:`PolicyOptionError`.
        coarse: project the correction onto coarse corrections, one value per token and image channel
            (:class:`CoarseGuidance`, saved with it): the action space of PPO's coarse exploration.
        device: where to create it (default: the backbone's device).
    """
    if not 0.0 <= min_t < 1.0:
        raise PolicyOptionError(f"min_t must be in [0, 1) (guide at times t >= min_t; 0 guides every step), got {min_t}")
    model = _build_network(name, backbone, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
                           text_conditioning=text_conditioning, device=device)
    if not text_conditioning and model.text_aware:
        raise PolicyOptionError(
            f"text_conditioning=False: policy {name!r} built a {type(model).__name__}, which reads the prompt "
            f"(text_aware); text-blind networks are built by {', '.join(map(repr, ARCHITECTURES.text_blind_names()))} "
            "(an architecture declares text_aware = False, or takes text_conditioning)")
    if coarse:
        model = CoarseGuidance(model, image_channels(backbone))
    return TimestepRangeGuidance([((min_t, 1.0), model)]) if min_t > 0 else model


POLICIES: ArchitectureRegistry = ARCHITECTURES
"""The architecture names (:data:`fluxguide.policies.architectures.ARCHITECTURES`, the one registry, under the name
the scripts' plug-in tests know)."""


def _build_network(
    name: PolicyName, backbone: Backbone, *, hidden_dim: int, num_layers: int, num_heads: int,
    text_conditioning: bool, device: torch.device | str | None,
) -> BaseGuidanceModel:
    factory: PolicyFactory = ARCHITECTURES.factory(name)
    cond = backbone.encode([""])
    options = {"hidden_dim": hidden_dim, "num_layers": num_layers, "num_heads": num_heads,
               "text_conditioning": text_conditioning, "vec_dim": cond.vec.shape[-1], "txt_dim": cond.txt.shape[-1],
               "grid_size": latent_grid(backbone), "device": device or backbone.device}
    try:
        model = call_with_options(factory, backbone, **options)
    except TypeError as e:  # a plug-in factory passing options its network does not take
        if not signature_mismatch(e):
            raise
        raise PolicyPluginError(f"policy {name!r} refused the options it was built with ({e}); make its factory "
                                f"take (backbone, **sizes) and pass on only what its network accepts") from e
    return check_saveable(model, name)


def check_saveable(model: object, name: str) -> BaseGuidanceModel:
    """``model`` if a run can checkpoint and reload it: a :class:`BaseGuidanceModel` whose JSON config rebuilds it
    (:func:`~fluxguide.policies.base.build_guidance_model`). Checked when the policy is built, so a plug-in that
    returns a plain ``nn.Module`` is refused before training, not at the first checkpoint.

    Raises:
        PolicyPluginError: naming the plug-in, what it built and how to make it a guidance network.
    """
    if not isinstance(model, BaseGuidanceModel):
        raise PolicyPluginError(
            f"policy {name!r} built a {type(model).__name__}, not a fluxguide guidance network: a run saves its "
            f"policy as weights plus the config that rebuilds it, so the factory must return a BaseGuidanceModel; "
            f"{GUIDANCE_CONTRACT}")
    config = model.config
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise PolicyPluginError(f"policy {name!r}: the config of its {type(model).__name__} is not JSON ({e}); "
                                f"{GUIDANCE_CONTRACT}") from None
    try:  # the config's entries must be constructor arguments (what from_config passes)
        inspect.signature(type(model).__init__).bind(model, **{k: v for k, v in config.items() if k != "type"})
    except TypeError as e:
        raise PolicyPluginError(f"policy {name!r}: its config {sorted(config)} does not rebuild "
                                f"{type(model).__name__} ({e}); {GUIDANCE_CONTRACT}") from None
    return model


@torch.no_grad()
def check_fits_backbone(policy: nn.Module, backbone: Backbone, *, name: str) -> None:
    """Raise :class:`PolicyMismatchError` unless every guidance network inside ``policy`` reads observations of
    ``backbone``'s sizes (latent channels, token grid, text and pooled-text widths; a size a network leaves
    ``None`` accepts any), naming ``name`` and each difference: found before any sampling, not at the first
    call. Costs one text encoding of the empty prompt."""
    cond = backbone.encode([""])
    expected = {"latent_channels": backbone.latent_channels, "grid_size": _grid_of(cond),
                "txt_dim": cond.txt.shape[-1], "vec_dim": cond.vec.shape[-1]}
    wrong: list[str] = []
    for module in policy.modules():
        if isinstance(module, GuidanceNetwork):
            for attr, want in expected.items():
                got = getattr(module, attr, None)
                if got is not None and (tuple(got) if attr == "grid_size" else got) != want:
                    wrong.append(f"{type(module).__name__} has {attr} {got}, the backbone's is {want}")
    if wrong:
        raise PolicyMismatchError(
            f"{name} does not fit {type(backbone).__name__}: {'; '.join(dict.fromkeys(wrong))}. It was built for "
            f"another base model: use it with the one it was trained on (the same --backbone and weights)")
