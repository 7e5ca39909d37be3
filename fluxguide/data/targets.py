"""Where behaviour-cloning targets come from: teachers, target strategies and the seed's ``GuidanceDataCollector``.

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
- ``user``: any teacher, or any function of the collected states.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import nn

from fluxguide.data.collection import FINAL_IMAGE, EpisodeChunk, GuidanceDataset, create_training_pairs
from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide import keys
from fluxguide.provenance import backbone_fingerprint
from fluxguide.rewards.base import require_differentiable
from fluxguide.sampling.denoise import GuidanceFn
from fluxguide.sampling.instrumented import NEXT_IMG, PRED_USED, denoise_with_state_collection

# ---------------------------------------------------------------- teachers (guidance functions)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` time as ``(B, 1, 1)`` in float32, to broadcast over ``(B, seq, C)``."""
    return t.float().reshape(-1, 1, 1).expand(like.shape[0], 1, 1)


class CFGTeacher(nn.Module):
    """Classifier-free guidance as a correction: ``(w - 1) * (pred_cond - pred_uncond)``.

    ``pred`` is the base model's conditional prediction, so ``pred + correction`` is CFG's prediction
    ``pred_uncond + w * (pred_cond - pred_uncond)`` (Ho & Salimans 2022). One extra (unconditional) model
    call per step.

    Args:
        model: the base velocity model (BFL signature).
        uncond: the encoded empty prompt (its ``txt``, ``vec``, ``txt_ids``, ``img_ids`` are used).
        scale: the CFG scale ``w``.
        guidance: the distilled-guidance strength the base model takes (``None`` if it has none).
    """

    def __init__(self, model: nn.Module, uncond: Conditioning, scale: float, guidance: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.uncond = uncond
        self.scale = float(scale)
        self.guidance = guidance

    @classmethod
    def from_backbone(cls, backbone: Backbone, scale: float) -> CFGTeacher:
        return cls(backbone, backbone.encode([""]), scale, backbone.default_guidance)

    def forward(self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                timestep: torch.Tensor, step_idx: int | torch.Tensor) -> torch.Tensor:
        b = img.shape[0]
        g = None if self.guidance is None else torch.full((b,), self.guidance, device=img.device, dtype=img.dtype)
        uncond = self.model(
            img=img, img_ids=self.uncond.img_ids, txt=self.uncond.txt.expand(b, -1, -1).to(txt.dtype),
            txt_ids=self.uncond.txt_ids, timesteps=timestep, y=self.uncond.vec.expand(b, -1).to(vec.dtype), guidance=g,
        )
        return (self.scale - 1.0) * (pred - uncond)


class RewardGradientTeacher(nn.Module):
    """A step up the gradient of a differentiable reward of the predicted clean image.

    ``correction = step_size * dR(decode(img - t * pred)) / d pred``: the change of the prediction that
    raises the reward fastest at first order. Since ``d x0_hat / d pred = -t``, this is
    ``-t * step_size * grad_x0 R``. With ``normalize`` each sample's gradient is rescaled to unit RMS first
    (a fixed-size step in its direction, robust to the reward's scale).

    Args:
        reward: a differentiable reward ``(images, prompts) -> (B,)``.
        decode: latents -> images in [0, 1], differentiable (``backbone.decode``).
        step_size: size of the step.
        normalize: rescale each sample's gradient to unit RMS before the step.
        prompts: the prompts of the current batch (set :attr:`prompts` before each sampling call).
    """

    def __init__(self, reward: nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], step_size: float = 1.0,
                 normalize: bool = False, prompts: Sequence[str] = ()) -> None:
        super().__init__()
        require_differentiable(reward)
        self.reward = reward
        self.decode = decode
        self.step_size = float(step_size)
        self.normalize = normalize
        self.prompts = list(prompts)

    def forward(self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                timestep: torch.Tensor, step_idx: int | torch.Tensor) -> torch.Tensor:
        if len(self.prompts) != img.shape[0]:
            raise ValueError(
                f"RewardGradientTeacher has {len(self.prompts)} prompts for a batch of {img.shape[0]}: set "
                "teacher.prompts to the batch's prompts before sampling"
            )
        with torch.enable_grad():
            p = pred.detach().float().requires_grad_(True)
            x0 = img.detach().float() - _per_sample(timestep, img) * p
            r = self.reward(self.decode(x0), self.prompts)
            (grad,) = torch.autograd.grad(r.sum(), p)
        if self.normalize:
            rms = grad.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
            grad = grad / rms.clamp_min(1e-12)
        return (self.step_size * grad).to(pred.dtype)


class ReferenceTeacher(nn.Module):
    """The correction that steers toward reference latents: ``strength * ((img - x_ref) / t - pred)``.

    At ``strength = 1`` the guided prediction is ``(img - x_ref) / t``, whose clean estimate
    ``img - t * v`` is exactly ``x_ref``; an Euler step then moves straight toward ``x_ref``.

    Args:
        reference: reference latents ``(B, seq, C)`` (one per sample of the batch; set :attr:`reference`
            before each sampling call).
        strength: fraction of the way from the base prediction to the reference velocity.
    """

    def __init__(self, reference: torch.Tensor | None = None, strength: float = 1.0) -> None:
        super().__init__()
        self.reference = reference
        self.strength = float(strength)

    def forward(self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                timestep: torch.Tensor, step_idx: int | torch.Tensor) -> torch.Tensor:
        if self.reference is None or self.reference.shape != img.shape:
            got = None if self.reference is None else tuple(self.reference.shape)
            raise ValueError(f"ReferenceTeacher needs reference latents shaped like img {tuple(img.shape)}, got {got}")
        return reference_correction(img, pred, self.reference, timestep, self.strength)


def reference_correction(img: torch.Tensor, pred: torch.Tensor, reference: torch.Tensor, t: torch.Tensor,
                         strength: float = 1.0) -> torch.Tensor:
    """``strength * ((img - reference) / t - pred)`` with ``t`` ``(B,)`` (or with step dims matching img)."""
    t = t.float().reshape(*t.shape, *([1] * (img.ndim - t.ndim)))
    if bool((t <= 0).any()):
        raise ValueError("the reference correction divides by t; it is undefined at t = 0 (the schedule's end)")
    return (strength * ((img.float() - reference.float()) / t - pred.float())).to(pred.dtype)


def _derangement(n: int, generator: torch.Generator) -> list[int]:
    """A random permutation of ``range(n)`` without fixed points: one random cycle through all ``n``."""
    if n < 2:
        raise ValueError(f"prompt swaps need at least 2 prompts per batch to swap between, got {n}")
    order = torch.randperm(n, generator=generator).tolist()
    donor = [0] * n
    for j, i in enumerate(order):
        donor[i] = order[(j + 1) % n]
    return donor


@torch.no_grad()
def relabel_with_prompts(backbone: Backbone, states: TensorDict, cond: Conditioning,
                         teacher: GuidanceFn) -> tuple[TensorDict, torch.Tensor]:
    """The visited latents of ``states`` seen under ``cond`` (one prompt per episode), with ``teacher``'s corrections.

    Every visited latent ``img`` keeps its time and step; the text (``txt``, ``vec``) becomes ``cond``'s, the
    conditional prediction ``pred`` is recomputed under it (one model call per step) and the target is the
    teacher's correction at that new observation. Returns ``(states, targets)`` ready for
    :func:`~fluxguide.data.collection.create_training_pairs` with ``cond``'s prompts.
    """
    b = states.batch_size[0]
    if cond.batch_size != b:
        raise ValueError(f"cond must hold one prompt per episode: {b} episodes, {cond.batch_size} prompts")
    img, t = states[keys.IMG], states[keys.T]
    preds, targets = [], []
    for step in range(img.shape[1]):
        x, t_vec = img[:, step], t[:, step].to(img.dtype)
        pred = backbone.velocity(x, t_vec, cond)
        preds.append(pred)
        targets.append(teacher(x, pred, cond.txt, cond.vec, t_vec, step))
    relabelled = states.clone(recurse=False)
    relabelled[keys.TXT], relabelled[keys.VEC] = cond.txt, cond.vec
    relabelled[keys.PRED] = torch.stack(preds, dim=1)
    for key in (PRED_USED, NEXT_IMG):  # they belong to the original trajectory, not to the new labels
        if key in relabelled.keys():
            del relabelled[key]
    return relabelled, torch.stack(targets, dim=1)


# ---------------------------------------------------------------- strategies


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


class LabelledGuidance(nn.Module):
    """Sample with ``behaviour`` while recording ``teacher``'s correction at every visited state.

    The guidance function of DAgger-style collection (Ross et al. 2011, "A Reduction of Imitation Learning
    and Structured Prediction to No-Regret Online Learning"): the student drives, the teacher labels, so the
    data covers the states the student actually reaches, including those its own errors lead to.
    """

    def __init__(self, behaviour: GuidanceFn, teacher: GuidanceFn) -> None:
        super().__init__()
        self.behaviour, self.teacher = behaviour, teacher
        self.labels: list[torch.Tensor] = []

    def forward(self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                timestep: torch.Tensor, step_idx: int | torch.Tensor) -> torch.Tensor:
        self.labels.append(self.teacher(img, pred, txt, vec, timestep, step_idx).detach())
        return self.behaviour(img, pred, txt, vec, timestep, step_idx)

    def targets(self) -> torch.Tensor:
        """The recorded corrections ``(B, T, seq, C)``."""
        return torch.stack(self.labels, dim=1)


class CFGDistillation(TargetStrategy):
    """Targets ``(w - 1) * (pred_cond - pred_uncond)`` at the states CFG's own sampler visits.

    Args:
        scale: the CFG scale ``w`` (the shapes world's is ``ShapesWorld.recommended_cfg_scale``).
        student: a guidance model to drive the sampler instead of CFG (DAgger, see
            :class:`LabelledGuidance`): the states are the student's, the targets still CFG's correction.
        student_scale: the scale at which the student guides the sampler.
        prompt_swaps: also label every visited trajectory under this many *other* prompts of its batch
            (see :func:`relabel_with_prompts`): each swap adds one episode per prompt whose states come from
            another prompt's trajectory, with that state's conditional prediction and CFG correction under
            the new prompt (its ``final_image`` stays the trajectory's own; a batch that holds a prompt twice
            can swap it with itself). In the sampled data a prompt's words only ever meet images drawn for them, so a
            student can read "bar" off the image instead of the text; swapped pairs break that correlation,
            which is what a held-out combination (a green bar) needs. Each swap costs two model calls per
            step (the new conditional and the unconditional prediction).
    """

    name = "cfg_distillation"

    def __init__(self, scale: float, student: GuidanceFn | None = None, student_scale: float = 1.0,
                 prompt_swaps: int = 0) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"the CFG scale must be finite, got {scale}")
        if prompt_swaps < 0:
            raise ValueError(f"prompt_swaps must be >= 0 (0: only the sampled prompt's labels), got {prompt_swaps}")
        self.scale = float(scale)
        self.student, self.student_scale = student, float(student_scale)
        self.prompt_swaps = int(prompt_swaps)

    def collect(self, batch: CollectionBatch) -> EpisodeChunk:
        teacher = CFGTeacher.from_backbone(batch.backbone, self.scale)
        meta = {**self.config(), "prompt_swaps": self.prompt_swaps}
        if self.student is None:
            chunk, _, states = _collect_with_teacher(batch, teacher, metadata={**meta, "visited_by": "teacher"})
        else:
            labelled = LabelledGuidance(self.student, teacher)
            chunk, _, states = _collect_with_teacher(batch, labelled, guidance_scale=self.student_scale,
                                                     targets=lambda states: labelled.targets(),
                                                     metadata={**meta, "visited_by": "student"})
        if self.prompt_swaps == 0:
            return chunk
        swapped = []
        for _ in range(self.prompt_swaps):
            prompts = [batch.prompts[i] for i in _derangement(len(batch.prompts), batch.generator)]
            relabelled, targets = relabel_with_prompts(batch.backbone, states, batch.backbone.encode(prompts), teacher)
            swapped.append(create_training_pairs(relabelled, prompts, targets, final_image=chunk.episodes[FINAL_IMAGE],
                                                 metadata=chunk.metadata))
        return EpisodeChunk.cat([chunk, *swapped])

    def config(self) -> dict[str, Any]:
        # The dataset-level settings: DAgger rounds (student-driven chunks) append to the teacher's dataset, and
        # so do chunks with prompt swaps (stored per chunk, since they only add pairs).
        return {"strategy": self.name, "cfg_scale": self.scale}


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
            rewards = self.reward(images, prompts).float().reshape(b, self.n)
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
    cls.name: cls for cls in (CFGDistillation, RewardGradientTargets, BestOfN, ReferenceImage, UserTargets)
}


def make_target_strategy(name: str, **kwargs: Any) -> TargetStrategy:
    """Build the strategy called ``name`` (see :data:`TARGET_STRATEGIES`) with ``kwargs``."""
    if name not in TARGET_STRATEGIES:
        raise ValueError(f"unknown target strategy {name!r}; valid strategies: {sorted(TARGET_STRATEGIES)}")
    return TARGET_STRATEGIES[name](**kwargs)


# ---------------------------------------------------------------- the seed's collector


class GuidanceDataCollector:
    """Automated data collection from generations (the seed's ``GuidanceDataCollector``).

    Args:
        backbone: the base model.
        strategy: a :class:`TargetStrategy` or its name (built with ``strategy_kwargs``).
        num_steps: sampler steps (default: the backbone's).
        **strategy_kwargs: arguments of the named strategy.
    """

    def __init__(self, backbone: Backbone, strategy: TargetStrategy | str, num_steps: int | None = None,
                 **strategy_kwargs: Any) -> None:
        if isinstance(strategy, str):
            strategy = make_target_strategy(strategy, **strategy_kwargs)
        elif strategy_kwargs:
            raise TypeError(f"strategy kwargs {sorted(strategy_kwargs)} only apply when strategy is a name")
        if not isinstance(strategy, TargetStrategy):
            raise TypeError(
                f"strategy must be a TargetStrategy or one of {sorted(TARGET_STRATEGIES)}, got {type(strategy).__name__}"
            )
        self.backbone, self.strategy = backbone, strategy
        self.num_steps = num_steps or backbone.default_num_steps
        self.timesteps = backbone.schedule(self.num_steps)

    def metadata(self) -> dict[str, Any]:
        """Dataset-level facts: the strategy's settings, the backbone (class and weights) and the number of steps."""
        # The fingerprint makes appending to a dataset of another base model's states an error (see create).
        return {**self.strategy.config(), "backbone": type(self.backbone).__name__, "num_steps": self.num_steps,
                "backbone_fingerprint": backbone_fingerprint(self.backbone)}

    def batch_generator(self, seed: int, batch_index: int) -> torch.Generator:
        """The generator of batch ``batch_index``: a function of both, so a resumed collection draws the same."""
        return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + batch_index)

    def collect(self, prompts: Sequence[str], seed: int = 0, batch_index: int = 0) -> EpisodeChunk:
        """Collect one batch: one trajectory per prompt (before the strategy's filtering)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("collect needs at least one prompt")
        generator = self.batch_generator(seed, batch_index)
        noise = torch.randn((len(prompts), *self.backbone.latent_shape), generator=generator)
        noise = noise.to(self.backbone.device)
        chunk = self.strategy.collect(CollectionBatch(self.backbone, prompts, noise, self.timesteps, generator))
        chunk.metadata.update({"batch_index": batch_index, "seed": seed})
        return chunk

    def collect_to(
        self,
        path: str | Path,
        prompts: Sequence[str],
        batch_size: int = 64,
        seed: int = 0,
        on_chunk: Callable[[int, EpisodeChunk], None] | None = None,
    ) -> GuidanceDataset:
        """Collect ``prompts`` in batches, appending each batch as one chunk of the dataset at ``path``.

        Resumable: batches whose ``(seed, batch_index)`` the dataset already holds are skipped, so rerunning
        after a crash finishes the collection without duplicating episodes.

        Args:
            path: the dataset folder (created, or appended to).
            prompts: every prompt to sample (repeat prompts for several samples per prompt).
            batch_size: prompts per batch (and per chunk).
            seed: the collection's seed.
            on_chunk: called as ``on_chunk(batch_index, chunk)`` after each append (progress, logging).
        """
        prompts = list(prompts)
        dataset = GuidanceDataset.create(path, self.metadata())
        done = {(m.get("seed"), m.get("batch_index")) for m in dataset.chunk_metadata}
        for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
            if (seed, batch_index) in done:
                continue
            chunk = self.collect(prompts[start : start + batch_size], seed=seed, batch_index=batch_index)
            if chunk.num_episodes:
                dataset.append(chunk)
            if on_chunk is not None:
                on_chunk(batch_index, chunk)
        return dataset
