"""What every target strategy shares: the batch it collects, its interface, and collection with a teacher as the
sampler's guidance (the strategies themselves: :mod:`fluxguide.data.targets`, :mod:`fluxguide.data.distillation`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict

from fluxguide import keys
from fluxguide.backbones.base import Backbone
from fluxguide.data.episodes import EpisodeChunk, create_training_pairs
from fluxguide.sampling.denoise import GuidanceFn
from fluxguide.sampling.instrumented import denoise_with_state_collection


def derangement(n: int, generator: torch.Generator) -> list[int]:
    """A random permutation of ``range(n)`` without fixed points: one random cycle through all ``n``."""
    if n < 2:
        raise ValueError(f"prompt swaps need at least 2 prompts per batch to swap between, got {n}")
    order = torch.randperm(n, generator=generator).tolist()
    donor = [0] * n
    for j, i in enumerate(order):
        donor[i] = order[(j + 1) % n]
    return donor



@dataclass
class CollectionBatch:
    """What a strategy needs to collect one batch: the backbone, prompts, their noise and the schedule."""

    backbone: Backbone
    prompts: list[str]
    noise: torch.Tensor
    timesteps: list[float]
    generator: torch.Generator


class TargetStrategy(ABC):
    """Samples trajectories for a batch of prompts and returns their (observation, target) pairs."""

    name: str = ""

    @abstractmethod
    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        """Collect the batch's episodes (one per prompt, or fewer when the strategy filters)."""

    def sampling_steps(self, collected_steps: int) -> int:
        """The step count of the sampler the pairs train, given the steps the collection samples at: the same,
        unless the strategy distils for a coarser sampler (:class:`CFGDistillation` with ``coarse_steps``)."""
        return collected_steps

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings, stored in the dataset's metadata."""
        return {"strategy": self.name}


def collect_with_teacher(
    batch: CollectionBatch, teacher: GuidanceFn | None, *, guidance_scale: float = 1.0, noise_level: float = 0.0,
    targets: Callable[[TensorDict], torch.Tensor] | None = None, metadata: dict[str, Any] | None = None,
) -> tuple[EpisodeChunk, torch.Tensor, TensorDict]:
    """Sample with ``teacher`` as guidance and pair each visited state with the teacher's correction."""
    bb = batch.backbone
    cond = bb.encode(batch.prompts)
    final, states = denoise_with_state_collection(
        bb, batch.noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, batch.timesteps,
        guidance=bb.default_guidance, guidance_model=teacher, guidance_scale=guidance_scale,
        noise_level=noise_level, generator=batch.generator,
    )
    if targets is None and teacher is not None and guidance_scale != 1.0:
        # The sampler applied scale * correction; the target is the correction at scale 1.
        targets = lambda s: (s["pred_used"] - s[keys.PRED]) / guidance_scale
    images = bb.decode(final)
    chunk = create_training_pairs(states, batch.prompts, targets, final_image=images, metadata=metadata)
    return chunk, final, states
