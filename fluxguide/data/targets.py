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

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.data.distillation import CFGDistillation, Distillation, PolicyDistillation
from fluxguide.data.episodes import EpisodeChunk, create_training_pairs
from fluxguide.data.strategy import CollectionBatch, TargetStrategy, collect_with_teacher
from fluxguide.data.teachers import ReferenceTeacher, RewardGradientTeacher, reference_correction
from fluxguide.rewards.base import call_reward, require_differentiable
from fluxguide.sampling.denoise import GuidanceFn
from fluxguide.sampling.instrumented import NEXT_IMG, denoise_with_state_collection

__all__ = ["TARGET_STRATEGIES", "BestOfN", "CFGDistillation", "CollectionBatch", "Distillation", "PolicyDistillation",
           "ReferenceImage", "RewardGradientTargets", "TargetStrategy", "UserTargets", "make_target_strategy"]


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
            return collect_with_teacher(batch, teacher, metadata=self.config())[0]

        def targets(states: TensorDict) -> torch.Tensor:
            _b, n = states[keys.IMG].shape[:2]
            flat = {k: states[k].flatten(0, 1) for k in (keys.IMG, keys.PRED, keys.T)}
            teacher.prompts = [p for p in batch.prompts for _ in range(n)]
            out = teacher(flat[keys.IMG], flat[keys.PRED], None, None, flat[keys.T], 0)  # type: ignore[arg-type]
            return out.reshape(states[keys.PRED].shape)

        return collect_with_teacher(batch, None, targets=targets, metadata=self.config())[0]

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
            return collect_with_teacher(batch, ReferenceTeacher(ref, self.strength), metadata=self.config())[0]

        def targets(states: TensorDict) -> torch.Tensor:
            x_ref = ref[:, None].expand_as(states[keys.IMG])
            return reference_correction(states[keys.IMG], states[keys.PRED], x_ref, states[keys.T], self.strength)

        return collect_with_teacher(batch, None, targets=targets, metadata=self.config())[0]

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
        return collect_with_teacher(batch, self.teacher, guidance_scale=self.guidance_scale,
                                     targets=self.target_fn, metadata=self.config())[0]


TARGET_STRATEGIES: dict[str, type[TargetStrategy]] = {
    cls.name: cls for cls in (CFGDistillation, PolicyDistillation, RewardGradientTargets, BestOfN, ReferenceImage, UserTargets)
}


def make_target_strategy(name: str, **kwargs: Any) -> TargetStrategy:
    """Build the strategy called ``name`` (see :data:`TARGET_STRATEGIES`) with ``kwargs``."""
    if name not in TARGET_STRATEGIES:
        raise ValueError(f"unknown target strategy {name!r}; valid strategies: {sorted(TARGET_STRATEGIES)}")
    return TARGET_STRATEGIES[name](**kwargs)
