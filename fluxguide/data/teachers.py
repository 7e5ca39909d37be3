"""Teachers: guidance functions ``f(img, pred, txt, vec, t, step) -> correction`` whose corrections are BC targets.

Collecting with a teacher as the sampler's guidance model visits the states the teacher's sampler visits and
records its correction (``pred_used - pred``) as the target; :mod:`fluxguide.data.targets` builds the target
strategies from them.

- :class:`CFGTeacher`: classifier-free guidance as a correction, ``(w - 1) * (pred_cond - pred_uncond)``.
- :class:`RewardGradientTeacher`: a step up a differentiable reward's gradient at the predicted clean image.
- :class:`ReferenceTeacher` / :func:`reference_correction`: steer toward reference latents.
- :class:`LabelledGuidance`: a student drives, a teacher labels (DAgger).
- :func:`relabel_with_prompts`: visited latents relabelled under other prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.rewards.base import call_reward, require_differentiable
from fluxguide.sampling.denoise import GuidanceFn
from fluxguide.sampling.instrumented import NEXT_IMG, PRED_USED


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
            r = call_reward(self.reward, self.decode(x0), self.prompts)
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


@torch.no_grad()
def relabel_with_prompts(backbone: Backbone, states: TensorDict, cond: Conditioning,
                         teacher: GuidanceFn) -> tuple[TensorDict, torch.Tensor]:
    """The visited latents of ``states`` seen under ``cond`` (one prompt per episode), with ``teacher``'s corrections.

    Every visited latent ``img`` keeps its time and step; the text (``txt``, ``vec``) becomes ``cond``'s, the
    conditional prediction ``pred`` is recomputed under it (one model call per step) and the target is the
    teacher's correction at that new observation. Returns ``(states, targets)`` ready for
    :func:`~fluxguide.data.episodes.create_training_pairs` with ``cond``'s prompts.
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
