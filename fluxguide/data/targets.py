"""Target strategies: where behaviour-cloning targets come from (teachers in :mod:`fluxguide.data.teachers`).

A *teacher* is a guidance function ``f(img, pred, txt, vec, t, step) -> correction``; collecting with the
teacher as the sampler's guidance model visits the states the teacher's sampler visits (so the student
learns the states it will see when it reproduces the teacher) and records the teacher's correction as the
target (``pred_used - pred``). Strategies (:data:`TARGET_STRATEGIES`):

- ``cfg_distillation``: the teacher is classifier-free guidance itself. With ``pred`` the conditional
  prediction, CFG's ``uncond + w (cond - uncond) = cond + (w - 1)(cond - uncond)``, so the target is
  ``(w - 1) * (pred_cond - pred_uncond)``: the student at one base call per step reproduces CFG at two.
- ``reward_gradient``: the teacher steps the prediction up the gradient of a differentiable reward of the
  predicted clean image ``x0_hat = img - t * pred`` (the seed's one-step ``train_from_reward`` view).
- ``best_of_n``: ``n`` noisy (SDE) trajectories per prompt, keep the top ``k`` by reward; targets are the
  corrections that lead each kept trajectory's states to its own final image (see :class:`BestOfN`).
- ``reference_image``: the correction that steers toward a given target image ``x_ref``. Since
  ``x0_hat = img - t * v``, the velocity whose clean estimate is ``x_ref`` is ``(img - x_ref) / t``; the
  target is that minus ``pred``.
- ``policy_distillation``: the teacher is a trained guidance network (e.g. the 20-step fine-tuned one, distilled
  into a few-step network with ``coarse_steps``).
- ``user``: any teacher, or any function of the collected states.
"""


from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.backbones.base import Backbone
from fluxguide.data.coarse import coarsen, relabel_coarse, substeps
from fluxguide.data.episodes import FINAL_IMAGE, EpisodeChunk, create_training_pairs
from fluxguide.data.teachers import (
    CFGTeacher,
    LabelledGuidance,
    ReferenceTeacher,
    RewardGradientTeacher,
    reference_correction,
    relabel_with_prompts,
)
from fluxguide.rewards.base import call_reward, require_differentiable
from fluxguide.sampling.denoise import GuidanceFn
from fluxguide.sampling.instrumented import NEXT_IMG, PRED_USED, denoise_with_state_collection


def _derangement(n: int, generator: torch.Generator) -> list[int]:
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


def _collect_with_teacher(
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

    def sampling_steps(self, collected_steps: int) -> int:
        return collected_steps if self.coarse_steps is None else self.coarse_steps

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        teacher = self.teacher(batch.backbone)
        meta = {**self.config(), "prompt_swaps": self.prompt_swaps, "visited_by": "teacher"}
        if self.coarse_steps is not None:
            return self._collect_coarse(batch, teacher, meta)
        chunk, _, states = _collect_with_teacher(batch, teacher, metadata=meta)
        return self._with_swaps(batch, chunk, states, teacher)

    def _with_swaps(self, batch: CollectionBatch, chunk: EpisodeChunk, states: TensorDict,
                    teacher: GuidanceFn) -> EpisodeChunk:
        """``chunk`` and, for every prompt swap, the same states labelled by ``teacher`` under other prompts."""
        swapped = []
        for _ in range(self.prompt_swaps):
            prompts = [batch.prompts[i] for i in _derangement(len(batch.prompts), batch.generator)]
            relabelled, targets = relabel_with_prompts(batch.backbone, states, batch.backbone.encode(prompts), teacher)
            swapped.append(create_training_pairs(relabelled, prompts, targets, final_image=chunk.episodes[FINAL_IMAGE],
                                                 metadata=chunk.metadata))
        return EpisodeChunk.cat([chunk, *swapped]) if swapped else chunk

    def _collect_coarse(self, batch: CollectionBatch, teacher: GuidanceFn, meta: dict[str, Any]) -> EpisodeChunk:
        """The teacher's trajectory at the collection's steps, as pairs of the coarse sampler (:func:`coarsen`);
        swapped prompts roll the teacher out from each coarse state under their own prompt (:func:`relabel_coarse`)."""
        assert self.coarse_steps is not None
        fine, _, states = _collect_with_teacher(batch, teacher, metadata=meta)
        images = fine.episodes[FINAL_IMAGE]
        coarse, targets = coarsen(states, states[PRED_USED] - states[keys.PRED], self.coarse_steps)
        chunks = [create_training_pairs(coarse, batch.prompts, targets, final_image=images, metadata=meta)]
        for _ in range(self.prompt_swaps):
            prompts = [batch.prompts[i] for i in _derangement(len(batch.prompts), batch.generator)]
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
        meta = {**self.config(), "prompt_swaps": self.prompt_swaps, "visited_by": "student"}
        chunk, _, states = _collect_with_teacher(batch, labelled, guidance_scale=self.student_scale,
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


class RewardGradientTargets(TargetStrategy):
    """Targets from a reward-gradient teacher (:class:`RewardGradientTeacher`) at the states it visits.

    Args:
        reward: a differentiable reward.
        step_size: the teacher's step size.
        normalize: rescale each sample's gradient to unit RMS.
        guide: visit the teacher-guided sampler's states (else the base sampler's; targets the same).
    """

    name = "reward_gradient"

    def __init__(self, reward: nn.Module, step_size: float = 1.0, normalize: bool = False, guide: bool = True) -> None:
        require_differentiable(reward)
        self.reward, self.step_size, self.normalize, self.guide = reward, float(step_size), normalize, guide

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        teacher = RewardGradientTeacher(self.reward, batch.backbone.decode, self.step_size, self.normalize,
                                        batch.prompts)
        if self.guide:
            return _collect_with_teacher(batch, teacher, metadata=self.config())[0]

        def targets(states: TensorDict) -> torch.Tensor:
            _b, n = states[keys.IMG].shape[:2]
            flat = {k: states[k].flatten(0, 1) for k in (keys.IMG, keys.PRED, keys.T)}
            teacher.prompts = [p for p in batch.prompts for _ in range(n)]
            out = teacher(flat[keys.IMG], flat[keys.PRED], None, None, flat[keys.T], 0)  # type: ignore[arg-type]
            return out.reshape(states[keys.PRED].shape)

        return _collect_with_teacher(batch, None, targets=targets, metadata=self.config())[0]

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "step_size": self.step_size, "normalize": self.normalize,
                "guide": self.guide, "reward": type(self.reward).__name__}


class BestOfN(TargetStrategy):
    """Best of ``n`` noisy trajectories per prompt: keep the top ``k`` by reward and imitate them.

    Each prompt is sampled ``n`` times with the SDE (``noise_level > 0``; 0 gives ``n`` ODE samples from
    different noise), the final images are scored, and the ``k`` best (at least ``min_reward``) are kept.
    The student should make the deterministic sampler produce what the selection produces, i.e. sample the
    reward-tilted distribution of kept images (rejection-sampling fine-tuning, RAFT, Dong et al. 2023,
    expressed as a correction). Targets, with ``x_0`` a kept final latent and ``v`` the base prediction:

    - ``"renoise"`` (default): flow matching on the kept images. Each kept ``x_0`` is re-noised along the
      forward process at every schedule time, ``x_t = (1 - t) x_0 + t eps`` with fresh ``eps``, the base
      model predicts ``v(x_t)``, and the target is ``(x_t - x_0) / t - v(x_t) = eps - x_0 - v(x_t)``.
      Regressed by MSE the student learns ``E[eps - x_0 | x_t]`` over the *kept* images minus the base
      velocity: exactly the correction under which the Euler sampler follows the flow of the kept
      distribution (if the base model is exact). Without selection (``n = k = 1``) its expectation is 0.
      The states are the forward process's, not a sampler's.
    - ``"endpoint"``: ``(x_k - x_0) / t_k - v_k`` on the kept trajectory's own states ``x_k``: the
      correction whose clean-image estimate is that trajectory's final image. The states are the ones a
      sampler visits, but the SDE's coupling of ``x_k`` and ``x_0`` is not the forward process's, so the
      regression target is the tilted velocity only approximately (biased even without selection).
    - ``"step"``: ``(x_{k+1} - x_k) / (t_{k+1} - t_k) - v_k``, the correction with which the deterministic
      Euler step from ``x_k`` lands exactly on the kept trajectory's next state. Literal, but it holds the
      SDE's injected noise divided by the step size (variance ``O(1 / dt)``) and the SDE's drift
      correction, which an ODE student should not copy; offered for comparison.

    Args:
        reward: any reward (differentiable or not, e.g. the shapes world's verifier).
        n: trajectories per prompt.
        top_k: trajectories kept per prompt.
        noise_level: the SDE's ``a`` (Flow-GRPO); 0 draws ODE samples.
        target: ``"renoise"``, ``"endpoint"`` or ``"step"``.
        min_reward: drop kept trajectories whose reward is below this (e.g. 1 for a verifier: pass only).
        renoise_samples: with ``"renoise"``, independent re-noisings of each kept image per schedule time
            (more pairs per kept image, at one base call each: the flow-matching target is noisy).
    """

    name = "best_of_n"

    def __init__(self, reward: nn.Module, n: int = 8, top_k: int = 1, noise_level: float = 0.7,
                 target: Literal["renoise", "endpoint", "step"] = "renoise",
                 min_reward: float | None = None, renoise_samples: int = 1) -> None:
        if not 1 <= top_k <= n:
            raise ValueError(f"best-of-N needs 1 <= top_k <= n, got top_k={top_k}, n={n}")
        if target not in ("renoise", "endpoint", "step"):
            raise ValueError(f"best-of-N target must be 'renoise', 'endpoint' or 'step', got {target!r}")
        if target == "step" and noise_level == 0:
            raise ValueError("the 'step' target of ODE samples is zero: use noise_level > 0 or target='endpoint'")
        if renoise_samples < 1:
            raise ValueError(f"renoise_samples must be >= 1, got {renoise_samples}")
        self.reward, self.n, self.top_k, self.noise_level = reward, int(n), int(top_k), float(noise_level)
        self.target, self.min_reward, self.renoise_samples = target, min_reward, int(renoise_samples)

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        bb, b = batch.backbone, len(batch.prompts)
        prompts = [p for p in batch.prompts for _ in range(self.n)]
        # n noises per prompt: the batch's noise for the first, fresh draws for the others.
        extra = torch.randn((b, self.n - 1, *batch.noise.shape[1:]), generator=batch.generator,
                            device=batch.generator.device).to(batch.noise)
        noise = torch.cat([batch.noise[:, None], extra], dim=1).flatten(0, 1)
        cond = bb.encode(prompts)
        final, states = denoise_with_state_collection(
            bb, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, batch.timesteps,
            guidance=bb.default_guidance, noise_level=self.noise_level, generator=batch.generator,
        )
        images = bb.decode(final)
        with torch.no_grad():
            rewards = call_reward(self.reward, images, prompts).reshape(b, self.n)
        # Top-k per prompt; ties keep the earlier sample (stable sort), so equal rewards are deterministic.
        order = torch.sort(rewards, dim=1, descending=True, stable=True).indices[:, : self.top_k]
        keep = torch.zeros(b, self.n, dtype=torch.bool, device=rewards.device)
        keep.scatter_(1, order, True)
        if self.min_reward is not None:
            keep &= rewards >= self.min_reward
        keep = keep.flatten()
        if self.target == "renoise" and bool(keep.any()):
            return self._renoised_pairs(batch, final[keep], images[keep], rewards.flatten()[keep],
                                        [p for p, k in zip(prompts, keep.tolist(), strict=True) if k])
        if self.target == "endpoint" or self.target == "renoise":  # (renoise with nothing kept: an empty chunk)
            x0 = final[:, None].expand_as(states[keys.IMG])
            targets = reference_correction(states[keys.IMG], states[keys.PRED], x0, states[keys.T])
        else:
            dt = (states["t_prev"] - states[keys.T]).float()[..., None, None]
            targets = ((states[NEXT_IMG].float() - states[keys.IMG].float()) / dt - states[keys.PRED].float())
        chunk = create_training_pairs(states, prompts, targets.to(states[keys.PRED].dtype), final_image=images,
                                      rewards=rewards.flatten(), metadata=self.config())
        return chunk.select_episodes(keep)

    @torch.no_grad()
    def _renoised_pairs(self, batch: CollectionBatch, x0: torch.Tensor, images: torch.Tensor, rewards: torch.Tensor,
                        prompts: list[str]) -> EpisodeChunk:
        """Flow-matching pairs on the kept final latents ``x0`` (see the ``"renoise"`` target)."""
        bb, e = batch.backbone, x0.shape[0]
        times = torch.tensor(batch.timesteps, dtype=torch.float32)
        num_steps = len(times) - 1
        # Every schedule time, renoise_samples times: a per-episode "step" axis of length R * T.
        step = torch.arange(num_steps).repeat(self.renoise_samples)
        t_now, t_next = times[:-1][step], times[1:][step]
        cond = bb.encode(prompts)
        eps = torch.randn((e, len(step), *x0.shape[1:]), generator=batch.generator,
                          device=batch.generator.device).to(x0)
        t = t_now.to(x0)[None, :, None, None]
        x_t = (1 - t) * x0[:, None] + t * eps
        # The base predictions at every re-noised state, batched across episodes and times.
        flat_x, flat_t = x_t.flatten(0, 1), t_now.to(x0).repeat(e)
        flat_cond = cond.repeat_interleave(len(step))
        pred = torch.cat([
            bb.velocity(flat_x[i : i + 256], flat_t[i : i + 256],
                        replace(flat_cond, txt=flat_cond.txt[i : i + 256], vec=flat_cond.vec[i : i + 256]))
            for i in range(0, flat_x.shape[0], 256)
        ]).reshape(x_t.shape)
        states = TensorDict({
            keys.IMG: x_t, keys.PRED: pred, keys.T: t_now.expand(e, -1).clone(),
            "t_prev": t_next.expand(e, -1).clone(), keys.STEP: step.expand(e, -1).clone(),
            keys.TXT: cond.txt, keys.VEC: cond.vec,
        }, batch_size=[e])
        targets = reference_correction(x_t, pred, x0[:, None].expand_as(x_t), states[keys.T])
        return create_training_pairs(states, prompts, targets, final_image=images, rewards=rewards,
                                     metadata=self.config())

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "n": self.n, "top_k": self.top_k, "noise_level": self.noise_level,
                "target": self.target, "min_reward": self.min_reward, "reward": type(self.reward).__name__,
                "renoise_samples": self.renoise_samples}


class ReferenceImage(TargetStrategy):
    """Targets that steer toward a reference image per prompt (:func:`reference_correction`).

    Args:
        reference: a function ``(prompts, generator) -> images (B, 3, H, W) in [0, 1]`` (encoded with the
            backbone's ``encode_images``) or ``-> latents (B, seq, C)``, where ``generator`` is the batch's
            (so a resumed collection draws the same references); or a fixed tensor of either, one per
            prompt of every batch.
        strength: the teacher's strength (1 lands exactly on the reference).
        guide: visit the teacher-guided sampler's states; else the base sampler's.
    """

    name = "reference_image"

    def __init__(self, reference: torch.Tensor | Callable[[list[str], torch.Generator], torch.Tensor],
                 strength: float = 1.0,
                 guide: bool = True) -> None:
        self.reference, self.strength, self.guide = reference, float(strength), guide

    def reference_latents(self, batch: CollectionBatch) -> torch.Tensor:
        ref = self.reference(batch.prompts, batch.generator) if callable(self.reference) else self.reference
        bb, b = batch.backbone, len(batch.prompts)
        if ref.ndim == 4:
            if not hasattr(bb, "encode_images"):
                raise ValueError(
                    f"{type(bb).__name__} cannot encode reference images (no encode_images): pass reference "
                    f"latents (B, {bb.latent_seq}, {bb.latent_channels}) instead"
                )
            ref = bb.encode_images(ref.to(bb.device))
        want = (b, bb.latent_seq, bb.latent_channels)
        if tuple(ref.shape) != want:
            raise ValueError(f"reference latents must be {want} (one per prompt), got {tuple(ref.shape)}")
        return ref.to(batch.noise)

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        ref = self.reference_latents(batch)
        if self.guide:
            return _collect_with_teacher(batch, ReferenceTeacher(ref, self.strength), metadata=self.config())[0]

        def targets(states: TensorDict) -> torch.Tensor:
            x_ref = ref[:, None].expand_as(states[keys.IMG])
            return reference_correction(states[keys.IMG], states[keys.PRED], x_ref, states[keys.T], self.strength)

        return _collect_with_teacher(batch, None, targets=targets, metadata=self.config())[0]

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "strength": self.strength, "guide": self.guide}


class UserTargets(TargetStrategy):
    """User-supplied targets: a teacher guidance function, or a function of the collected states.

    Args:
        teacher: ``f(img, pred, txt, vec, t, step) -> correction``; sampling follows it and the target is
            its correction.
        target_fn: ``states -> targets (B, T, seq, C)``, computed on the base sampler's states.
        guidance_scale: the scale at which the teacher guides the sampler.
    """

    name = "user"

    def __init__(self, teacher: GuidanceFn | None = None,
                 target_fn: Callable[[TensorDict], torch.Tensor] | None = None, guidance_scale: float = 1.0) -> None:
        if (teacher is None) == (target_fn is None):
            raise ValueError("UserTargets needs exactly one of teacher= (a guidance function) or target_fn=")
        self.teacher, self.target_fn, self.guidance_scale = teacher, target_fn, float(guidance_scale)

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        return _collect_with_teacher(batch, self.teacher, guidance_scale=self.guidance_scale,
                                     targets=self.target_fn, metadata=self.config())[0]


TARGET_STRATEGIES: dict[str, type[TargetStrategy]] = {
    cls.name: cls for cls in (CFGDistillation, PolicyDistillation, RewardGradientTargets, BestOfN, ReferenceImage, UserTargets)
}


def make_target_strategy(name: str, **kwargs: Any) -> TargetStrategy:
    """Build the strategy called ``name`` (see :data:`TARGET_STRATEGIES`) with ``kwargs``."""
    if name not in TARGET_STRATEGIES:
        raise ValueError(f"unknown target strategy {name!r}; valid strategies: {sorted(TARGET_STRATEGIES)}")
    return TARGET_STRATEGIES[name](**kwargs)
