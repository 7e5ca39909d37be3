"""Named backbones of the experiment scripts, and the reward each one is trained against by default.

``"shapes"`` is the pretrained shapes world (the default of every script), ``"shapes-random"`` a randomly
initialised one (smoke tests: every code path in seconds), ``"tiny-flux"`` a tiny random diffusers Flux with
a CLIP score over a tiny random open_clip (the real-Flux code path, end to end, without weights), and
``"flux"`` real Flux weights through :meth:`fluxguide.backbones.FluxBackbone.from_pretrained` (``model_path``:
a local diffusers FluxPipeline folder or a hub id such as ``black-forest-labs/FLUX.1-dev``), trained against
any registry reward built with the user's keyword arguments (e.g. ``make_reward("clip", model_name=...,
pretrained=<local open_clip weights>)``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxguide.backbones.base import Backbone
from fluxguide.plugins import Registry, call_with_options

BackboneName = str
"""A backbone name (``"shapes"``, ``"shapes-random"``, ``"tiny-flux"``, ``"flux"``, an entry-point name of an
installed package) or a spec ``"package.module:factory"``."""

BackboneFactory = Callable[..., Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone", "fluxguide.backbones")
"""Every backbone name. A factory takes keyword-only options among ``seed``, ``device``, ``dtype``,
``num_steps``, ``weights_dir``, ``model_path``, ``height``, ``width``, ``max_sequence_length``; it gets those it
declares (all of them if it takes ``**kwargs``)."""

#: A tiny random open_clip (ViT on 32x32 crops, 2-layer text tower): the reward of the tiny-Flux code path.
TINY_CLIP_CFG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


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
    from diffusers import FluxPipeline

    from fluxguide.backbones.flux import FluxBackbone
    from fluxguide.backbones.tiny_flux import tiny_flux_components

    pipe = FluxPipeline(**tiny_flux_components(seed=seed))
    backbone = FluxBackbone.from_pipeline(pipe, height=64, width=64, max_sequence_length=16,
                                          num_steps=num_steps).to(device)
    backbone.preset_name = "tiny-flux"  # build_reward gives it the tiny random CLIP score
    return backbone


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
        raise TypeError(f"backbone {name!r} built a {type(backbone).__name__}, not a fluxguide Backbone")
    return backbone


def build_reward(name: str, backbone: Backbone, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The reward ``name`` (a :func:`fluxguide.rewards.make_reward` name) for ``backbone``, built with ``kwargs``.

    A world's own rewards get what the backbone supplies (:meth:`Backbone.reward_kwargs`: the shapes world's
    ``shapes-*`` rewards share its tiny CLIP). The ``"tiny-flux"`` backbone's reward is a CLIP score over a tiny random open_clip
    whatever ``name`` and ``kwargs`` say (there is no trained reward model for random images). Any other
    backbone (real Flux) gets ``make_reward(name, **kwargs)``, on the backbone's device unless ``kwargs`` name
    one, e.g. ``build_reward("clip", flux, model_name="ViT-L-14", pretrained="/weights/vitl14.safetensors")``.
    """
    from fluxguide.rewards import CLIPScore, load_open_clip, make_reward

    if getattr(backbone, "preset_name", None) != "tiny-flux":
        key = name.strip().lower().replace("_", "-")
        if backbone.verifier is None and (key.startswith("shapes-") or key in ("verifier", "verifier-partial")):
            raise ValueError(
                f"reward {name!r} belongs to the shapes world and cannot score {type(backbone).__name__} images; "
                "use e.g. 'clip' with its weights (scripts: --reward clip --reward-kwargs "
                "'{\"model_name\": \"ViT-L-14\", \"pretrained\": \"/weights/open_clip_vitl14.safetensors\"}')"
            )
        if key in ("clip", "style", "aesthetic"):  # the open_clip rewards: next to the backbone by default
            kwargs.setdefault("device", backbone.device)
        return make_reward(name, **{**backbone.reward_kwargs(name), **kwargs})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, tokenizer = load_open_clip("fluxguide-tiny-random-clip", None, model_cfg=TINY_CLIP_CFG,
                                         device=backbone.device)
    return CLIPScore(clip, tokenizer)


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
