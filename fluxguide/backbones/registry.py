"""Named backbones of the experiment scripts, and the one function that builds a reward for a backbone.

``"shapes"`` is the pretrained shapes world (the default of every script), ``"shapes-random"`` a randomly
initialised one (smoke tests: every code path in seconds), ``"tiny-flux"`` a tiny random diffusers Flux whose
only reward is a CLIP score over a tiny random open_clip (the real-Flux code path, end to end, without weights),
and ``"flux"`` real Flux weights through :meth:`fluxguide.backbones.FluxBackbone.from_pretrained` (``model_path``:
a local diffusers FluxPipeline folder or a hub id such as ``black-forest-labs/FLUX.1-dev``), trained against
any registry reward built with the user's keyword arguments (e.g. ``build_reward("clip", flux,
model_name=..., pretrained=<local open_clip weights>)``). Which rewards a backbone scores, and what it gives
them, is the backbone's to say (:meth:`Backbone.build_reward`), never a backbone name's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxguide.backbones.base import Backbone
from fluxguide.backbones.calls import MODEL_CALLS
from fluxguide.plugins import PluginError, Registry, call_with_options
from fluxguide.rewards.callable_reward import CallableReward
from fluxguide.rewards.registry import TINY_CLIP_CFG

__all__ = ["BACKBONES", "TINY_CLIP_CFG", "BackboneName", "RewardLike", "build_backbone", "build_reward",
           "parse_reward_kwargs"]

BackboneName = str
"""A backbone name (``"shapes"``, ``"shapes-random"``, ``"tiny-flux"``, ``"flux"``, an entry-point name of an
installed package) or a spec ``"package.module:factory"``."""

BackboneFactory = Callable[..., Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone", "fluxguide.backbones")
"""Every backbone name. A factory takes keyword-only options among ``seed``, ``device``, ``dtype``,
``num_steps``, ``weights_dir``, ``model_path``, ``height``, ``width``, ``max_sequence_length``; it gets those it
declares (all of them if it takes ``**kwargs``)."""

RewardLike = nn.Module | str | Callable[[torch.Tensor, list[str]], torch.Tensor]
"""A reward module, a registry name or spec, or a callable ``fn(images, prompts) -> (B,)``."""


@BACKBONES.register("flux")
def _flux(
    *, model_path: str | None = None, device: torch.device | str = "cpu", num_steps: int | None = None,
    height: int = 1024, width: int = 1024, max_sequence_length: int = 512,
) -> Backbone:
    from fluxguide.backbones.flux import FluxBackbone

    if model_path is None:
        raise ValueError(
            "backbone 'flux' needs model_path: a local diffusers FluxPipeline folder or a hub id such as "
            "'black-forest-labs/FLUX.1-dev' (scripts: --model-path)"
        )
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    return FluxBackbone.from_pretrained(model_path, device=device, height=height, width=width,
                                        max_sequence_length=max_sequence_length, **kwargs)


@BACKBONES.register("tiny-flux")
def _tiny_flux(*, seed: int = 0, device: torch.device | str = "cpu", num_steps: int | None = None) -> Backbone:
    from fluxguide.backbones.tiny_flux import TinyFluxBackbone

    return TinyFluxBackbone.random(seed=seed, device=device, num_steps=num_steps)


def build_backbone(
    name: BackboneName,
    *,
    weights_dir: Path | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_steps: int | None = None,
    model_path: str | None = None,
    height: int = 1024,
    width: int = 1024,
    max_sequence_length: int = 512,
) -> Backbone:
    """The backbone called ``name`` (random ones are initialised from ``seed`` without touching the global RNG).

    Args:
        name: ``"shapes"``, ``"shapes-random"``, ``"tiny-flux"``, ``"flux"``, an entry-point name, or a spec
            ``"package.module:factory"``.
        weights_dir: the shapes world's weight folder (default: the weights shipped in the package).
        seed: initialisation seed of the random backbones.
        device: where to put it.
        dtype: the shapes world's weights' dtype (default float32).
        num_steps: the Flux backbones' default number of sampling steps.
        model_path: ``"flux"`` only (and required there): a local diffusers FluxPipeline folder or a hub id.
        height, width: ``"flux"`` only: image size, multiples of 16.
        max_sequence_length: ``"flux"`` only: T5 tokens per prompt (512 for FLUX.1-dev, at most 256 for
            FLUX.1-schnell).

    Raises:
        fluxguide.plugins.PluginError: unknown name (the message lists the valid ones) or a bad spec.
    """
    factory = BACKBONES.get(name)
    options = {"weights_dir": weights_dir, "seed": seed, "device": device, "dtype": dtype, "num_steps": num_steps,
               "model_path": model_path, "height": height, "width": width, "max_sequence_length": max_sequence_length}
    backbone = call_with_options(factory, **options)
    if not isinstance(backbone, Backbone):
        raise PluginError(f"backbone {name!r} built a {type(backbone).__name__}, not a fluxguide Backbone: return a "
                          "subclass of fluxguide.backbones.Backbone (guide: Plug in a new backbone)")
    return MODEL_CALLS.attach(backbone)  # every base-model call of the process is counted (backbones/calls.py)


def build_reward(reward: RewardLike | None, backbone: Backbone, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The reward to score ``backbone``'s images with: how the scripts, the envs and the collector all build one.

    Args:
        reward: a registry name or spec, built by the backbone (:meth:`Backbone.build_reward`: with what the
            backbone gives it, refused if it belongs to another world; ``None``: the backbone's
            :meth:`~Backbone.default_reward`), e.g. ``build_reward("clip", flux, model_name="ViT-L-14",
            pretrained="/weights/vitl14.safetensors")``; or a reward module (used as it is); or a callable
            ``fn(images, prompts) -> (B,)`` (a :class:`~fluxguide.rewards.CallableReward`).
        backbone: the base model whose images the reward scores.
        seed: the seed of a random reward (the tiny-Flux backbone's tiny random CLIP).
        **kwargs: the reward's options (a registry name only; they win over what the backbone gives).
    """
    if reward is None or isinstance(reward, str):
        return backbone.build_reward(reward, seed=seed, **kwargs)
    if kwargs:
        raise ValueError(f"reward_kwargs {sorted(kwargs)} are only used with a reward registry name, not a built reward")
    if isinstance(reward, nn.Module):
        return reward
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(
        f"reward must be a reward module, a registry name or a callable fn(images, prompts) -> (B,), "
        f"got {type(reward).__name__}"
    )


def parse_reward_kwargs(text: str | None) -> dict[str, Any]:
    """The keyword arguments of a reward from a JSON object string (the scripts' ``--reward-kwargs``); ``{}``
    for ``None`` or an empty string."""
    import json

    if text is None or not text.strip():
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--reward-kwargs {text!r} is not valid JSON ({e}); pass a JSON object such as "
            '\'{"model_name": "ViT-L-14", "pretrained": "/weights/open_clip_vitl14.safetensors"}\''
        ) from e
    if not isinstance(kwargs, dict):
        raise TypeError(f"--reward-kwargs must be a JSON object ({{\"key\": value, ...}}), got {text!r}")
    return kwargs
