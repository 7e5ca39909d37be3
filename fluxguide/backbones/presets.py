"""Named backbones of the experiment scripts, and the reward each one is trained against by default.

``"shapes"`` is the pretrained shapes world (the default of every script), ``"shapes-random"`` a randomly
initialised one (smoke tests: every code path in seconds), ``"tiny-flux"`` a tiny random diffusers Flux with
a CLIP score over a tiny random open_clip (the real-Flux code path, end to end, without weights). For real
Flux weights build :class:`fluxguide.backbones.FluxBackbone` with ``from_pretrained`` (a local folder or a
hub id) and pass it and a reward to the algorithms directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fluxguide.backbones.base import Backbone

BackboneName = Literal["shapes", "shapes-random", "tiny-flux"]

#: A tiny random open_clip (ViT on 32x32 crops, 2-layer text tower): the reward of the tiny-Flux code path.
TINY_CLIP_CFG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_backbone(
    name: BackboneName,
    *,
    weights_dir: Path | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_steps: int | None = None,
) -> Backbone:
    """The backbone called ``name`` (random ones are initialised from ``seed`` without touching the global RNG).

    Args:
        name: ``"shapes"``, ``"shapes-random"`` or ``"tiny-flux"``.
        weights_dir: the shapes world's weight folder (default: the weights shipped in the package).
        seed: initialisation seed of the random backbones.
        device: where to put it.
        num_steps: the tiny Flux's default number of sampling steps.
    """
    if name == "tiny-flux":
        from diffusers import FluxPipeline

        from fluxguide.backbones.flux import FluxBackbone
        from fluxguide.backbones.tiny_flux import tiny_flux_components

        pipe = FluxPipeline(**tiny_flux_components(seed=seed))
        return FluxBackbone.from_pipeline(pipe, height=64, width=64, max_sequence_length=16,
                                          num_steps=num_steps).to(device)
    from fluxguide.backbones.shapes import ShapesWorld, create_shapes_clip

    if name == "shapes-random":
        from fluxguide.backbones.shapes.world import build_transformer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ShapesWorld(create_shapes_clip(), build_transformer()).to(device)
    if name == "shapes":
        return ShapesWorld.pretrained(weights_dir, device=device)
    raise ValueError(f"unknown backbone {name!r}: choose one of {BackboneName.__args__}")


def build_reward(name: str, backbone: Backbone, *, seed: int = 0) -> nn.Module:
    """The reward ``name`` (a :func:`fluxguide.rewards.make_reward` name) for ``backbone``.

    On the shapes world this is :func:`fluxguide.envs.core.build_reward` (its ``shapes-*`` rewards share the
    world's tiny CLIP). Any other backbone here is
    the tiny random Flux, whose reward is a CLIP score over a tiny random open_clip whatever ``name`` says
    (there is no trained reward model for random images).
    """
    from fluxguide.backbones.shapes import ShapesWorld
    from fluxguide.envs.core import build_reward as build_env_reward
    from fluxguide.rewards import CLIPScore, load_open_clip

    if isinstance(backbone, ShapesWorld):
        return build_env_reward(name, backbone, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, tokenizer = load_open_clip("fluxguide-tiny-random-clip", None, model_cfg=TINY_CLIP_CFG,
                                         device=backbone.device)
    return CLIPScore(clip, tokenizer)
