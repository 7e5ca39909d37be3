"""Rewards of the shapes world (docs/design.md, "The shapes world"): its tiny CLIP score, its aesthetic
head and its exact verifier.

The world lives in ``fluxguide.worlds.shapes`` and is imported inside the functions, so this module
loads (and the other rewards work) without it. Passing ``world=`` shares one loaded world between rewards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fluxguide.rewards.aesthetic import LAION_DROPOUTS, AestheticPredictor, AestheticReward
from fluxguide.rewards.base import RewardModel
from fluxguide.rewards.clip_score import CLIPCaptionLogProb, CLIPScore


def load_shapes_world(world: Any = None, device: torch.device | str = "cpu") -> Any:
    """``world`` if given, else the shipped pretrained shapes world on ``device``."""
    if world is not None:
        return world
    from fluxguide.worlds.shapes import ShapesWorld

    return ShapesWorld.pretrained(device=device)


def shapes_clip_score(world: Any = None, *, device: torch.device | str = "cpu", **kwargs: Any) -> CLIPScore:
    """The shapes world's tiny CLIP as a text-image reward.

    Args:
        world: a loaded ``ShapesWorld`` (default: load the pretrained one).
        device: where to load the world if ``world`` is not given.
        **kwargs: passed to :class:`CLIPScore` (``scale``, ...).
    """
    world = load_shapes_world(world, device)
    return CLIPScore(world.clip, world.tokenizer, **kwargs)


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


class VerifierReward(RewardModel):
    """The shapes world's exact verifier as a reward: 1 if the image shows what its prompt says, else 0.

    Not differentiable (it thresholds the image), so it is a PPO reward and the held-out metric that tells
    real improvement from reward hacking. After each call ``last_components`` holds the verifier's
    per-attribute scores (``count``, ``kind``, ``color``, ``position``).

    With ``partial_credit = c > 0`` the reward is ``passed + c * mean(attribute scores)``: still the
    verifier's judgement, but an image that gets three of four attributes right scores above one that gets
    none, so a group of samples of one prompt that all fail still ranks them (the all-or-nothing pass is
    rare early in training, and PPO's per-prompt advantages are zero for groups that all score the same).

    Args:
        verify: ``verify(images, prompts)`` returning an object with ``.passed`` (bool ``(B,)``) and
            ``.scores`` (``{name: (B,)}``); default: ``fluxguide.worlds.shapes.verifier.verify``.
        partial_credit: weight ``c`` of the mean attribute score (0: pass/fail only).
    """

    differentiable = False

    def __init__(
        self, verify: Callable[[torch.Tensor, list[str]], Any] | None = None, partial_credit: float = 0.0
    ) -> None:
        super().__init__()
        if verify is None:
            from fluxguide.worlds.shapes.verifier import verify
        if not (partial_credit >= 0 and math.isfinite(partial_credit)):
            raise ValueError(f"partial_credit must be a finite number >= 0, got {partial_credit}")
        self.verify = verify
        self.partial_credit = float(partial_credit)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            result = self.verify(images.detach(), prompts)
        self.last_components = {
            name: torch.as_tensor(values).detach().float().to(images.device)
            for name, values in result.scores.items()
        }
        reward = torch.as_tensor(result.passed).float().to(images.device)
        if self.partial_credit > 0:
            reward = reward + self.partial_credit * torch.stack(list(self.last_components.values())).mean(0)
        return reward


def verifier_partial(partial_credit: float = 0.5, **kwargs: Any) -> VerifierReward:
    """The verifier with partial credit for the attributes it gets right (a denser reward for PPO)."""
    return VerifierReward(partial_credit=partial_credit, **kwargs)
