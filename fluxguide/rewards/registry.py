"""Rewards chosen by name: ``make_reward("clip", model=..., tokenizer=...)``.

Built-in names:

- ``"clip"``: :class:`CLIPScore` (``model=`` + ``tokenizer=``, or ``model_name=`` + ``pretrained=``).
- ``"style"``: :class:`StyleSimilarity` (``references=`` and ``model=`` or ``model_name=`` + ``pretrained=``).
- ``"aesthetic"``: :class:`AestheticReward` (``clip_model=`` + ``predictor=``, or ``predictor_path=`` and
  optionally ``clip_model=`` / ``clip_model_name=`` + ``clip_pretrained=``).
- ``"shapes-clip"``, ``"shapes-aesthetic"``, ``"verifier"``: the shapes world's rewards (``world=``);
  ``"verifier-partial"``: the verifier with partial credit 0.5 for the attributes it gets right;
  ``"shapes-clip-retrieval"``: the tiny CLIP's log-probability of the prompt among all captions. The shapes
  world declares these in the ``fluxguide.rewards`` entry-point group (fluxguide's ``pyproject.toml``), as
  any installed package can.
- ``"weighted-sum"`` (alias ``"sum"``): :class:`WeightedSum`; ``parts={name: spec}`` where a spec is a
  reward, ``(reward, weight)``, ``(registry_name, weight)`` or ``(registry_name, weight, kwargs)``.
- ``"callable"``: :class:`CallableReward` (``fn=``, ``differentiable=``).
- ``"verifier-attributes"``: a world's verifier (``verify=``, which a backbone with a verifier gives) as the mean of
  its attribute scores, a graded non-differentiable reward.
- ``"brightness"``: :class:`MeanBrightness`, the mean pixel value: a reward any policy can raise without drawing
  the prompt (the probe of the reward-hacking diagnostics, :mod:`fluxguide.harness.monitoring`).
- ``"tiny-random-clip"``: a CLIP score over a tiny random open_clip (:data:`TINY_CLIP_CFG`) drawn from ``seed=``,
  the only reward of the ``"tiny-flux"`` backbone (there is no trained reward model for random images).

A factory may declare the world whose images it scores (:func:`world_reward`); a backbone of another world
refuses it (``Backbone.build_reward``). The options a backbone gives a reward (``device``, ``verify``, ``world``,
``seed``) are those its factory names in its signature (:func:`reward_options`).

Projects add their own with ``@register_reward("name")`` on a factory returning a reward module, with an
entry point in the ``fluxguide.rewards`` group, or by passing a spec ``"my_pkg.my_module:make_my_reward"``
wherever a reward name is taken (:mod:`fluxguide.plugins`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from fluxguide.plugins import Registry, build_plugin, canonical_name
from fluxguide.rewards.aesthetic import AestheticPredictor, AestheticReward
from fluxguide.rewards.base import REGISTRY_NAME_ATTR
from fluxguide.rewards.brightness import MeanBrightness
from fluxguide.rewards.callable_reward import CallableReward
from fluxguide.rewards.clip_score import CLIPScore
from fluxguide.rewards.composite import WeightedSum
from fluxguide.rewards.open_clip_models import load_open_clip
from fluxguide.rewards.style import StyleSimilarity
from fluxguide.rewards.verifier import VerifierReward

RewardFactory = Callable[..., nn.Module]
FactoryT = TypeVar("FactoryT", bound=Callable[..., Any])

REWARDS: Registry[RewardFactory] = Registry("reward", "fluxguide.rewards")
"""Every reward name: registered here, declared by an installed package's entry point, or a spec."""


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering ``factory(**kwargs) -> reward`` under ``name`` (case-insensitive, ``_`` = ``-``).

    Raises:
        ValueError: ``name`` is taken and ``overwrite`` is False.
    """
    return REWARDS.register(name, overwrite=overwrite)


def available_rewards() -> list[str]:
    """The registered reward names (in code and by entry points), sorted."""
    return REWARDS.names()


#: The attribute :func:`world_reward` sets on a factory: the world whose images it scores.
WORLD_ATTR = "scores_world"


def world_reward(world: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator declaring that a reward factory scores the images of ``world`` only (a backbone whose
    ``world_name`` is ``world``), e.g. the shapes world's rewards, which read its tiny CLIP and verifier; the
    backbones of other worlds refuse it by this declaration."""

    def declare(factory: FactoryT) -> FactoryT:
        setattr(factory, WORLD_ATTR, world)
        return factory

    return declare


def reward_world(name: str) -> str | None:
    """The world the reward ``name`` declares (:func:`world_reward`), ``None`` for a reward of any image."""
    world = getattr(REWARDS.get(name), WORLD_ATTR, None)
    return world if isinstance(world, str) else None


def reward_options(name: str) -> frozenset[str]:
    """The keyword options the factory of reward ``name`` (a function, or a class's constructor) names in its
    signature; options it takes only through ``**kwargs`` are not counted (they may not reach what it builds)."""
    try:
        params = inspect.signature(REWARDS.get(name)).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return frozenset()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in named)


def make_reward(name: str, **kwargs: Any) -> nn.Module:
    """Build the reward ``name`` with ``kwargs``: a registered name, an entry-point name, or a spec
    ``"package.module:factory"`` (a callable returning a reward module).

    Raises:
        fluxguide.plugins.PluginError: unknown name (the message lists the valid ones), or a spec whose module
            or attribute fails to import (the message names which).
    """
    canonical_name(name)  # a clear TypeError for a non-string
    reward = build_plugin("reward", name, REWARDS.get(name), **kwargs)
    if isinstance(reward, nn.Module) and not getattr(reward, REGISTRY_NAME_ATTR, None):
        # Error messages about its output name it as the user did (call_reward, RewardModel.forward).
        setattr(reward, REGISTRY_NAME_ATTR, name)
    return reward


@register_reward("clip")
def _make_clip(
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    model_name: str = "ViT-L-14",
    pretrained: str | os.PathLike[str] | None = "openai",
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> CLIPScore:
    if model is not None:  # a given model stays where it is; ``device`` places the one loaded here
        if tokenizer is None:
            raise ValueError(
                "make_reward('clip', model=...) also needs tokenizer= (open_clip.get_tokenizer(name))."
            )
        return CLIPScore(model, tokenizer, **kwargs)
    return CLIPScore.from_pretrained(model_name, pretrained, device=device, **kwargs)


@register_reward("style")
def _make_style(
    references: torch.Tensor | None = None,
    model: nn.Module | None = None,
    *,
    model_name: str = "ViT-L-14",
    pretrained: str | os.PathLike[str] | None = "openai",
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> StyleSimilarity:
    if references is None:
        raise ValueError("make_reward('style') needs references= (reference images (R, 3, H, W) in [0, 1]).")
    if model is not None:
        return StyleSimilarity(model, references, **kwargs)
    return StyleSimilarity.from_pretrained(model_name, pretrained, references, device=device, **kwargs)


@register_reward("aesthetic")
def _make_aesthetic(
    predictor_path: str | os.PathLike[str] | None = None,
    *,
    clip_model: nn.Module | None = None,
    predictor: AestheticPredictor | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> AestheticReward:
    if predictor is None and predictor_path is None:
        raise ValueError(
            "make_reward('aesthetic') needs predictor_path= (e.g. a local sac+logos+ava1-l14-linearMSE.pth) "
            "or predictor= (an AestheticPredictor)."
        )
    if clip_model is None:
        if predictor is not None:
            raise ValueError("make_reward('aesthetic', predictor=...) also needs clip_model=.")
        return AestheticReward.from_files(predictor_path, device=device, **kwargs)
    if predictor is None:
        arch = {k: kwargs.pop(k) for k in ("input_dim", "hidden", "dropouts") if k in kwargs}
        predictor = AestheticPredictor.from_file(predictor_path, device=device, **arch)  # type: ignore[arg-type]
    return AestheticReward(clip_model, predictor, **kwargs)


register_reward("callable")(CallableReward)
register_reward("brightness")(MeanBrightness)


@register_reward("verifier-attributes")
def _make_verifier_attributes(verify: Callable[[torch.Tensor, list[str]], Any] | None = None) -> VerifierReward:
    if verify is None:
        raise ValueError("make_reward('verifier-attributes') needs verify= (a world's verifier); a backbone with a "
                         "verifier gives its own (Backbone.build_reward), and one without has none to score with")
    return VerifierReward(verify, partial_credit=1.0, pass_weight=0.0)


#: A tiny random open_clip (ViT on 32x32 crops, 2-layer text tower): the reward of the tiny-Flux code path.
TINY_CLIP_CFG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@register_reward("tiny-random-clip")
def _make_tiny_random_clip(*, seed: int = 0, device: torch.device | str = "cpu") -> CLIPScore:
    # Drawn from ``seed`` without touching the global RNG, so a run's other random draws do not move.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, tokenizer = load_open_clip("fluxguide-tiny-random-clip", None, model_cfg=TINY_CLIP_CFG, device=device)
    return CLIPScore(clip, tokenizer)


def _build_part(name: str, spec: object) -> tuple[nn.Module, float]:
    if isinstance(spec, nn.Module):
        return spec, 1.0
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        reward, weight = spec[0], spec[1]
        kwargs = spec[2] if len(spec) == 3 else {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"part {name!r}: the third item must be a dict of kwargs, got {kwargs!r}.")
        if isinstance(reward, str):
            reward = make_reward(reward, **kwargs)
        elif kwargs:
            raise TypeError(f"part {name!r}: kwargs are only used with a registry name, not a built reward.")
        return reward, weight
    raise TypeError(
        f"part {name!r} must be a reward, (reward or name, weight) or (name, weight, kwargs), got {spec!r:.80}."
    )


@register_reward("weighted-sum")
def _make_weighted_sum(parts: Mapping[str, object] | None = None) -> WeightedSum:
    if not parts:
        raise ValueError("make_reward('weighted-sum') needs parts={name: (reward or registry name, weight)}.")
    return WeightedSum({name: _build_part(name, spec) for name, spec in parts.items()})


register_reward("sum")(_make_weighted_sum)
