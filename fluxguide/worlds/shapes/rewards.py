"""Rewards of the shapes world (docs/design.md, "The shapes world"): its tiny CLIP score, its aesthetic
head, their sum and its exact verifier.

Each declares the world it scores (:func:`fluxguide.rewards.registry.world_reward`), so another backbone refuses
them and the shapes world hands them itself as ``world=`` (``Backbone.reward_kwargs``): one loaded world shared
between rewards. Without ``world=`` they load the pretrained world (imported inside the functions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fluxguide.rewards import verifier
from fluxguide.rewards.aesthetic import LAION_DROPOUTS, AestheticPredictor, AestheticReward
from fluxguide.rewards.clip_score import CLIPCaptionLogProb, CLIPScore
from fluxguide.rewards.composite import WeightedSum
from fluxguide.rewards.registry import world_reward

WORLD_NAME = "shapes"
"""The world's name: :attr:`ShapesWorld.world_name`, and the world its rewards declare."""


def load_shapes_world(world: Any = None, device: torch.device | str = "cpu") -> Any:
    """``world`` if given, else the shipped pretrained shapes world on ``device``."""
    if world is not None:
        return world
    from fluxguide.worlds.shapes import ShapesWorld

    return ShapesWorld.pretrained(device=device)


@world_reward(WORLD_NAME)
def shapes_clip_score(world: Any = None, *, device: torch.device | str = "cpu", **kwargs: Any) -> CLIPScore:
    """The shapes world's tiny CLIP as a text-image reward.

    Args:
        world: a loaded ``ShapesWorld`` (default: load the pretrained one).
        device: where to load the world if ``world`` is not given.
        **kwargs: passed to :class:`CLIPScore` (``scale``, ...).
    """
    world = load_shapes_world(world, device)
    return CLIPScore(world.clip, world.tokenizer, **kwargs)


@world_reward(WORLD_NAME)
def shapes_clip_retrieval(
    world: Any = None, *, device: torch.device | str = "cpu", **kwargs: Any
) -> CLIPCaptionLogProb:
    """The tiny CLIP's log-probability of the prompt among all 300 captions of the world's grammar.

    A contrastive form of :func:`shapes_clip_score`: its gradient points at what distinguishes the prompt
    from captions that differ in one attribute (a circle's from a bar's outline), not at what they share.
    """
    from fluxguide.worlds.shapes.scenes import all_prompts

    world = load_shapes_world(world, device)
    return CLIPCaptionLogProb(world.clip, world.tokenizer, all_prompts(), **kwargs)


@world_reward(WORLD_NAME)
def shapes_aesthetic(world: Any = None, *, device: torch.device | str = "cpu") -> AestheticReward:
    """The shapes world's aesthetic head (an :class:`AestheticPredictor`) on its tiny CLIP.

    The head's layout is ``AestheticPredictor(world.clip_embed_dim, world.aesthetic_hidden, dropouts)`` with
    the LAION dropouts unless the world sets ``aesthetic_dropouts``; its weights are ``world.aesthetic_path``.

    Args:
        world: a loaded ``ShapesWorld`` (default: load the pretrained one).
        device: where to load the world if ``world`` is not given.
    """
    world = load_shapes_world(world, device)
    clip_device = next(world.clip.parameters()).device
    predictor = AestheticPredictor.from_file(
        world.aesthetic_path,
        input_dim=world.clip_embed_dim,
        hidden=tuple(world.aesthetic_hidden),
        dropouts=tuple(getattr(world, "aesthetic_dropouts", LAION_DROPOUTS)),
        device=clip_device,
    )
    return AestheticReward(world.clip, predictor)


@world_reward(WORLD_NAME)
class VerifierReward(verifier.VerifierReward):
    """The shapes world's exact verifier as a reward: 1 if the image shows what its prompt says, else 0
    (:class:`fluxguide.rewards.verifier.VerifierReward`; ``last_components``: ``count``, ``kind``, ``color``,
    ``position``).

    Args:
        verify: the verifier (default: ``fluxguide.worlds.shapes.verifier.verify``, the world's own).
        partial_credit: weight ``c`` of the mean attribute score added to the pass (0: pass/fail only).
    """

    def __init__(
        self, verify: Callable[[torch.Tensor, list[str]], Any] | None = None, partial_credit: float = 0.0
    ) -> None:
        if verify is None:
            from fluxguide.worlds.shapes.verifier import verify
        super().__init__(verify, partial_credit=partial_credit)


@world_reward(WORLD_NAME)
def verifier_partial(
    partial_credit: float = 0.5, verify: Callable[[torch.Tensor, list[str]], Any] | None = None
) -> VerifierReward:
    """The verifier with partial credit for the attributes it gets right (a denser reward for PPO)."""
    return VerifierReward(verify, partial_credit=partial_credit)


@world_reward(WORLD_NAME)
def shapes_composite(world: Any = None, *, device: torch.device | str = "cpu", clip_weight: float = 1.0,
                     aesthetic_weight: float = 1.0) -> WeightedSum:
    """A composite reward: the tiny CLIP score plus the aesthetic head (both near 0.85 on the base sampler's
    images, so equal weights weigh them alike), the multi-objective reward of the reward study."""
    world = load_shapes_world(world, device)
    return WeightedSum({"clip": (shapes_clip_score(world), clip_weight),
                        "aesthetic": (shapes_aesthetic(world), aesthetic_weight)})
