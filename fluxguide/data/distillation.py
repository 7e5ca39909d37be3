"""Distillation strategies: a teacher's corrections at the states its own sampler visits, from classifier-free
guidance (:class:`CFGDistillation`) or a trained guidance network (:class:`PolicyDistillation`), optionally under
swapped prompts and for a coarser sampler (:mod:`fluxguide.data.coarse`)."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.backbones.base import Backbone
from fluxguide.data.coarse import coarsen, relabel_coarse, substeps
from fluxguide.data.episodes import FINAL_IMAGE, EpisodeChunk, create_training_pairs
from fluxguide.data.strategy import CollectionBatch, TargetStrategy, collect_with_teacher, derangement
from fluxguide.data.teachers import CFGTeacher, LabelledGuidance, relabel_with_prompts
from fluxguide.sampling.denoise import GuidanceFn
from fluxguide.sampling.instrumented import PRED_USED


class Distillation(TargetStrategy):
    """Targets of a teacher guidance at the states the teacher's own sampler visits: its corrections, or with
    ``coarse_steps`` its displacements over each coarse step; optionally relabelled under swapped prompts.

    Subclasses say who the teacher is (:meth:`teacher`): :class:`CFGDistillation` (classifier-free guidance) and
    :class:`PolicyDistillation` (a trained guidance network).

    Args:
        prompt_swaps: also label every visited trajectory under this many *other* prompts of its batch
            (see :func:`relabel_with_prompts`): each swap adds one episode per prompt whose states come from
            another prompt's trajectory, with that state's conditional prediction and the teacher's correction
            under the new prompt (its ``final_image`` stays the trajectory's own; a batch that holds a prompt
            twice can swap it with itself). In the sampled data a prompt's words only ever meet images drawn for
            them, so a student can read "bar" off the image instead of the text; swapped pairs break that
            correlation, which is what a held-out combination (a green bar) needs. Each swap costs one model call
            per step plus the teacher's own (CFG: one more).
        coarse_steps: distil for a ``coarse_steps``-step sampler (few-step guidance, :mod:`fluxguide.data.coarse`):
            the teacher samples at the collection's steps (a multiple of ``coarse_steps``) and every coarse step's
            target is the correction with which one Euler step lands where the teacher's fine steps land.
            ``None``: one pair per sampled step, the target the teacher's correction there.
    """

    def __init__(self, prompt_swaps: int = 0, coarse_steps: int | None = None) -> None:
        if prompt_swaps < 0:
            raise ValueError(f"prompt_swaps must be >= 0 (0: only the sampled prompt's labels), got {prompt_swaps}")
        if coarse_steps is not None:
            substeps(coarse_steps, coarse_steps)  # an integer >= 1
        self.prompt_swaps = int(prompt_swaps)
        self.coarse_steps = coarse_steps

    @abstractmethod
    def teacher(self, backbone: Backbone) -> GuidanceFn:
        """The guidance whose corrections are the targets, for ``backbone``."""

    def chunk_metadata(self, visited_by: str) -> dict[str, Any]:
        """What each collected chunk records: the dataset-level settings, its prompt swaps and whose sampler
        visited its states (``"teacher"`` or, in a DAgger round, ``"student"``)."""
        return {**self.config(), "prompt_swaps": self.prompt_swaps, "visited_by": visited_by}

    def sampling_steps(self, collected_steps: int) -> int:
        return collected_steps if self.coarse_steps is None else self.coarse_steps

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        teacher = self.teacher(batch.backbone)
        meta = self.chunk_metadata("teacher")
        if self.coarse_steps is not None:
            return self._collect_coarse(batch, teacher, meta)
        chunk, _, states = collect_with_teacher(batch, teacher, metadata=meta)
        return self._with_swaps(batch, chunk, states, teacher)

    def _with_swaps(self, batch: CollectionBatch, chunk: EpisodeChunk, states: TensorDict,
                    teacher: GuidanceFn) -> EpisodeChunk:
        """``chunk`` and, for every prompt swap, the same states labelled by ``teacher`` under other prompts."""
        swapped = []
        for _ in range(self.prompt_swaps):
            prompts = [batch.prompts[i] for i in derangement(len(batch.prompts), batch.generator)]
            relabelled, targets = relabel_with_prompts(batch.backbone, states, batch.backbone.encode(prompts), teacher)
            swapped.append(create_training_pairs(relabelled, prompts, targets, final_image=chunk.episodes[FINAL_IMAGE],
                                                 metadata=chunk.metadata))
        return EpisodeChunk.cat([chunk, *swapped]) if swapped else chunk

    def _collect_coarse(self, batch: CollectionBatch, teacher: GuidanceFn, meta: dict[str, Any]) -> EpisodeChunk:
        """The teacher's trajectory at the collection's steps, as pairs of the coarse sampler (:func:`coarsen`);
        swapped prompts roll the teacher out from each coarse state under their own prompt (:func:`relabel_coarse`)."""
        assert self.coarse_steps is not None
        fine, _, states = collect_with_teacher(batch, teacher, metadata=meta)
        images = fine.episodes[FINAL_IMAGE]
        coarse, targets = coarsen(states, states[PRED_USED] - states[keys.PRED], self.coarse_steps)
        chunks = [create_training_pairs(coarse, batch.prompts, targets, final_image=images, metadata=meta)]
        for _ in range(self.prompt_swaps):
            prompts = [batch.prompts[i] for i in derangement(len(batch.prompts), batch.generator)]
            relabelled, swapped = relabel_coarse(batch.backbone, coarse, batch.backbone.encode(prompts), teacher,
                                                 batch.timesteps)
            chunks.append(create_training_pairs(relabelled, prompts, swapped, final_image=images, metadata=meta))
        return EpisodeChunk.cat(chunks)

    def config(self) -> dict[str, Any]:
        # The dataset-level settings: DAgger rounds (student-driven chunks) append to the teacher's dataset, and
        # so do chunks with prompt swaps (stored per chunk, since they only add pairs).
        config: dict[str, Any] = {"strategy": self.name}
        if self.coarse_steps is not None:
            config["coarse_steps"] = self.coarse_steps
        return config


class CFGDistillation(Distillation):
    """Targets ``(w - 1) * (pred_cond - pred_uncond)`` at the states CFG's own sampler visits.

    Args:
        scale: the CFG scale ``w`` (a backbone's ``recommended_cfg_scale``; 3 in the shapes world).
        student: a guidance model to drive the sampler instead of CFG (DAgger, see
            :class:`LabelledGuidance`): the states are the student's, the targets still CFG's correction.
        student_scale: the scale at which the student guides the sampler.
        prompt_swaps, coarse_steps: see :class:`Distillation`.
    """

    name = "cfg_distillation"

    def __init__(self, scale: float, student: GuidanceFn | None = None, student_scale: float = 1.0,
                 prompt_swaps: int = 0, coarse_steps: int | None = None) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"the CFG scale must be finite, got {scale}")
        super().__init__(prompt_swaps, coarse_steps)
        if coarse_steps is not None and student is not None:
            raise ValueError("coarse_steps with a student (DAgger) is not supported: a student's states would "
                             "need CFG rolled out from each; collect the teacher's states (no student)")
        self.scale = float(scale)
        self.student, self.student_scale = student, float(student_scale)

    def teacher(self, backbone: Backbone) -> GuidanceFn:
        return CFGTeacher.from_backbone(backbone, self.scale)

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        if self.student is None:
            return super().collect(batch)
        teacher = self.teacher(batch.backbone)
        labelled = LabelledGuidance(self.student, teacher)
        meta = self.chunk_metadata("student")
        chunk, _, states = collect_with_teacher(batch, labelled, guidance_scale=self.student_scale,
                                                 targets=lambda states: labelled.targets(), metadata=meta)
        return self._with_swaps(batch, chunk, states, teacher)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "cfg_scale": self.scale}


class PolicyDistillation(Distillation):
    """Targets of a trained guidance network, the teacher, at the states its own sampler visits: with
    ``coarse_steps``, progressive distillation of a many-step policy into a few-step one (Salimans & Ho 2022), e.g.
    the 20-step fine-tuned network (82% held-out on the shapes world) into a 4-step network, whose distillation
    from CFG itself starts far lower (docs/results.md, "Few-step guidance").

    Args:
        teacher: the trained guidance model (``load_guidance_model`` of a ``guidance.safetensors``), sampled at
            the collection's steps, which should be the steps it was trained at.
        source: where the teacher came from (a path), recorded in the dataset's metadata.
        prompt_swaps, coarse_steps: see :class:`Distillation`.
    """

    name = "policy_distillation"

    def __init__(self, teacher: nn.Module, source: str = "", prompt_swaps: int = 0,
                 coarse_steps: int | None = None) -> None:
        super().__init__(prompt_swaps, coarse_steps)
        self.network = teacher.eval().requires_grad_(False)
        self.source = str(source)

    def teacher(self, backbone: Backbone) -> GuidanceFn:
        return self.network

    def config(self) -> dict[str, Any]:
        return {**super().config(), "teacher": self.source}
