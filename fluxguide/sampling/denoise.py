"""The guided Euler loop: Flux's ``denoise`` with a guidance model in it.

Adapted from black-forest-labs/flux ``src/flux/sampling.py`` (``denoise``): the same loop and the same
model signature ``model(img=, img_ids=, txt=, txt_ids=, y=, timesteps=, guidance=)``, plus the seed's
guidance arguments. At every step ``pred_used = pred + scale * guidance_model(img, pred, txt, vec, t, i)``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from fluxguide.sampling.conditioning import Conditioning, FluxModel, model_velocity
from fluxguide.sampling.steps import euler_step

GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
GuidanceScale = float | Sequence[float] | Callable[[int], float]
StepFn = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
"""``step(img, pred_used, t_curr, t_prev) -> next img``: how the loop moves from one time to the next."""


SCALE_FORMS = "a float, a list with one float per step, or a callable step_idx -> float"


def _is_number(x: object) -> bool:
    return (isinstance(x, numbers.Real) and not isinstance(x, bool)) or (
        isinstance(x, torch.Tensor) and x.ndim == 0 and x.dtype != torch.bool
    )


def check_guidance_scale(guidance_scale: object, num_steps: int) -> None:
    """Raise unless ``guidance_scale`` is one of the accepted forms: a real number (or 0-d tensor), a sequence
    of ``num_steps`` numbers, or a callable ``step_idx -> float`` (not called here).

    Raises:
        TypeError: a string or any other non-number, naming the value and the accepted forms.
        ValueError: a per-step list of the wrong length.
    """
    if callable(guidance_scale) or _is_number(guidance_scale):
        return
    shown = repr(guidance_scale)
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    if isinstance(guidance_scale, (str, bytes)):
        try:
            hint = f" (guidance_scale={float(guidance_scale)!r}, not {shown})"
        except ValueError:
            hint = ""
        raise TypeError(f"guidance_scale must be {SCALE_FORMS}, got the string {shown}; pass a number{hint}")
    try:
        scales = list(guidance_scale)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"guidance_scale must be {SCALE_FORMS}, got {shown} of type {type(guidance_scale).__name__}"
        ) from None
    bad = [(i, s) for i, s in enumerate(scales) if not _is_number(s)]
    if bad:
        i, s = bad[0]
        raise TypeError(
            f"a per-step guidance_scale must hold numbers, but entry {i} is {s!r} ({type(s).__name__}); "
            f"guidance_scale must be {SCALE_FORMS}"
        )
    if len(scales) != num_steps:
        raise ValueError(f"a per-step guidance_scale needs one value per step: got {len(scales)} for {num_steps} steps")


def scale_at(guidance_scale: GuidanceScale, step_idx: int, num_steps: int) -> float:
    """The guidance scale of step ``step_idx``: a constant, one entry of a list, or ``scale(step_idx)``."""
    if callable(guidance_scale):
        return float(guidance_scale(step_idx))
    if isinstance(guidance_scale, numbers.Real) or (
        isinstance(guidance_scale, torch.Tensor) and guidance_scale.ndim == 0
    ):  # numbers.Real also admits numpy scalars, which ``list()`` below cannot iterate
        return float(guidance_scale)
    check_guidance_scale(guidance_scale, num_steps)
    return float(list(guidance_scale)[step_idx])


def check_finite(name: str, x: torch.Tensor, step_idx: int, t: float) -> None:
    """Raise if ``x`` holds NaN or inf, naming the tensor, the step and how many values are bad."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise FloatingPointError(
            f"non-finite values in {name} at step {step_idx} (t={t:.4f}): {int(bad.sum())} of {x.numel()} "
            f"entries are NaN/inf. Check the model inputs, the guidance model's weights and the learning rate."
        )


def apply_guidance_model(
    guidance_model: GuidanceFn,
    img: torch.Tensor,
    pred: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    t_vec: torch.Tensor,
    step_idx: int,
    scale: float,
) -> torch.Tensor:
    """Return ``pred + scale * correction`` after checking the correction's shape (the seed's helper)."""
    correction = guidance_model(img, pred, txt, vec, t_vec, step_idx)
    if not isinstance(correction, torch.Tensor) or correction.shape != pred.shape:
        got = tuple(correction.shape) if isinstance(correction, torch.Tensor) else type(correction).__name__
        raise ValueError(
            f"guidance model returned a correction of shape {got}, but pred has shape {tuple(pred.shape)}: "
            f"the correction must be shaped like the prediction (B, seq, C)"
        )
    return pred + scale * correction.to(pred.dtype)


def check_batch(img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, img_ids: torch.Tensor) -> None:
    """Check that latent, text features and pooled vector agree on the batch size and ids on the length."""
    if img.ndim != 3:
        raise ValueError(f"img must be packed latents (B, seq, C), got shape {tuple(img.shape)}")
    if txt.ndim != 3 or vec.ndim != 2:
        raise ValueError(f"txt must be (B, L, D) and vec (B, D), got {tuple(txt.shape)} and {tuple(vec.shape)}")
    if not (img.shape[0] == txt.shape[0] == vec.shape[0]):
        raise ValueError(
            f"batch sizes differ: img {tuple(img.shape)}, txt {tuple(txt.shape)}, vec {tuple(vec.shape)}; "
            f"encode one prompt per latent (repeat the conditioning for several samples per prompt)"
        )
    if img_ids.shape[-2] != img.shape[1]:
        raise ValueError(f"img_ids has {img_ids.shape[-2]} positions but img has seq {img.shape[1]}")


def check_timesteps(timesteps: Sequence[float]) -> int:
    """The number of steps of a schedule of ``num_steps + 1`` times; raise unless it has at least one step and
    its times are finite and strictly decreasing (``t = 1`` is noise, ``t = 0`` data)."""
    if isinstance(timesteps, (str, bytes)) or not hasattr(timesteps, "__len__"):
        raise TypeError(
            f"timesteps must be a sequence of floats from get_schedule (noise t=1 first), got {type(timesteps).__name__}"
        )
    times = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    num_steps = len(times) - 1
    if num_steps < 1:
        raise ValueError(f"timesteps must hold at least 2 values (num_steps >= 1), got {times}")
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise TypeError(f"timesteps must be numbers, got {times[:5]}...") from None
    bad = [i for i, t in enumerate(values) if not math.isfinite(t)]
    if bad:
        raise ValueError(
            f"timesteps[{bad[0]}] is {values[bad[0]]}: every time must be a finite number in [0, 1]; "
            "build the schedule with get_schedule(num_steps, seq_len) (or backbone.schedule(num_steps))"
        )
    for i, (a, b) in enumerate(itertools.pairwise(values)):
        if not b < a:
            hint = (" They increase: the sampler runs from noise (t=1) to data (t=0), so reverse the list."
                    if values[-1] > values[0] else "")
            raise ValueError(
                f"timesteps must decrease strictly from noise (t=1) to data (t=0), but timesteps[{i + 1}]={b:.6g} "
                f"is not below timesteps[{i}]={a:.6g}.{hint} Use get_schedule(num_steps, seq_len) or "
                "backbone.schedule(num_steps)"
            )
    return num_steps


def guided_prediction(model: FluxModel, img: torch.Tensor, cond: Conditioning, guidance: float | None,
                      t_curr: float, step_idx: int, guidance_model: GuidanceFn | None, scale: float,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's ``(pred, pred_used)``: the model's velocity at ``t_curr`` and, with a guidance model, the
    guided ``pred + scale * correction`` (else ``pred`` itself)."""
    t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
    pred = model_velocity(model, img, t_vec, cond, guidance)
    if guidance_model is None:
        return pred, pred
    return pred, apply_guidance_model(guidance_model, img, pred, cond.txt, cond.vec, t_vec, step_idx, scale)


def denoise(
    model: FluxModel,
    img: torch.Tensor,
    img_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    vec: torch.Tensor,
    timesteps: Sequence[float],
    guidance: float | None = 4.0,
    guidance_model: GuidanceFn | None = None,
    guidance_scale: GuidanceScale = 1.0,
    guidance_requires_grad: bool = False,
    *,
    grad_last_k: int | None = None,
    gradient_checkpointing: bool = True,
    check_finite_values: bool = True,
    callback: Callable[[int, float, float, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    step_fn: StepFn = euler_step,
) -> torch.Tensor:
    """Sample with Flux's Euler loop, optionally adding a guidance model's correction at every step.

    Args:
        model: a BFL-signature velocity model (a backbone, or the BFL ``Flux`` module).
        img: initial noise, packed ``(B, seq, C)``.
        img_ids, txt_ids: position ids ``(seq, 3)`` / ``(L, 3)`` (or batched ``(B, ., 3)``).
        txt, vec: text token features ``(B, L, D_txt)`` and pooled embedding ``(B, D_vec)``.
        timesteps: the ``num_steps + 1`` times from :func:`get_schedule`.
        guidance: distilled guidance strength (Flux-dev); ``None`` for models without it.
        guidance_model: ``f(img, pred, txt, vec, timestep (B,), step_idx) -> correction`` shaped like pred.
        guidance_scale: a float, a list with one float per step, or a callable ``step_idx -> float``.
        guidance_requires_grad: keep the graph so a loss on the result backpropagates into the guidance
            model (reward-gradient training). Otherwise the whole loop runs under ``torch.no_grad``.
        grad_last_k: in differentiable mode, only the last ``k`` steps keep a graph; earlier steps run
            without grad (truncated backprop, DRaFT-K). ``None`` keeps all steps.
        gradient_checkpointing: in differentiable mode, recompute each step's activations in the backward
            pass instead of storing them (memory O(1) in the number of steps, one extra forward).
        check_finite_values: raise on NaN/inf in the prediction or the guided prediction.
        callback: called after each step as ``callback(step_idx, t_curr, t_prev, img, pred, pred_used)``
            with ``img`` the latent *before* the step (used by state collection and the envs).
        step_fn: ``step_fn(img, pred_used, t_curr, t_prev) -> next latent``; Flux's Euler step by default
            (state collection passes Flow-GRPO's SDE step). With gradient checkpointing it runs twice in the
            backward pass, so a random step must draw its noise outside (or keep ``guidance_requires_grad`` off).

    Returns:
        The final latent ``(B, seq, C)``.
    """
    num_steps = check_timesteps(timesteps)
    check_guidance_scale(guidance_scale, num_steps)
    check_batch(img, txt, vec, img_ids)
    if grad_last_k is not None and not 1 <= grad_last_k <= num_steps:
        raise ValueError(f"grad_last_k must be in [1, {num_steps}] (the number of steps), got {grad_last_k}")
    cond = Conditioning(txt=txt, vec=vec, txt_ids=txt_ids, img_ids=img_ids)
    first_grad_step = 0 if grad_last_k is None else num_steps - grad_last_k

    def step(img: torch.Tensor, t_curr: float, t_prev: float, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = scale_at(guidance_scale, i, num_steps) if guidance_model is not None else 1.0
        pred, pred_used = guided_prediction(model, img, cond, guidance, t_curr, i, guidance_model, scale)
        return step_fn(img, pred_used, t_curr, t_prev), pred, pred_used

    for i, (t_curr, t_prev) in enumerate(itertools.pairwise(timesteps)):
        with_grad = guidance_requires_grad and i >= first_grad_step
        with torch.set_grad_enabled(with_grad):
            if with_grad and gradient_checkpointing:
                new_img, pred, pred_used = checkpoint(step, img, t_curr, t_prev, i, use_reentrant=False)
            else:
                new_img, pred, pred_used = step(img, t_curr, t_prev, i)
        if check_finite_values:
            check_finite("the model prediction", pred, i, t_curr)
            if pred_used is not pred:
                check_finite("the guided prediction (pred + scale * correction)", pred_used, i, t_curr)
        if callback is not None:
            callback(i, t_curr, t_prev, img, pred, pred_used)
        img = new_img
    return img

