"""The seed's instrumented sampler: ``denoise`` that also returns the state of every step.

``denoise_with_state_collection`` runs the same guided loop as :func:`fluxguide.sampling.denoise` (the ODE
path *is* ``denoise``, through its ``callback``, so the final latent is bit for bit the same) and records,
for every step, the observation a guidance model sees and what the sampler did with it. With
``noise_level > 0`` it runs the marginal-preserving SDE of Flow-GRPO instead (the noisy trajectories that
best-of-N data collection draws).

The states come back as one :class:`~tensordict.TensorDict` with batch size ``[B]``: per-step entries
carry a step dimension after the batch (``img`` is ``(B, T, seq, C)``) and the per-episode constants
``txt`` / ``vec`` are kept once per sample, not once per step (docs/design.md, "envs").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from tensordict import TensorDict

from fluxguide.sampling.denoise import (
    FluxModel,
    GuidanceFn,
    GuidanceScale,
    check_batch,
    check_finite,
    check_guidance_scale,
    check_timesteps,
    denoise,
    guided_prediction,
    scale_at,
)
from fluxguide.sampling.steps import sde_step

# The observation keys of the denoising MDP, spelled as in ``fluxguide.keys`` (a layer above this
# one, so not imported from there; tests/sampling/test_instrumented.py checks that they agree).
IMG, PRED, TXT, VEC, T, STEP = "img", "pred", "txt", "vec", "t", "step"
PRED_USED = "pred_used"
"""The prediction the sampler stepped with: ``pred + scale * correction`` ``(B, T, seq, C)``."""
T_PREV = "t_prev"
"""The time each step went to, ``(B, T)``."""
NEXT_IMG = "next_img"
"""The latent after each step ``(B, T, seq, C)`` (only with ``noise_level > 0``, where it is random)."""


def denoise_with_state_collection(
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
    save_states: bool = True,
    *,
    noise_level: float = 0.0,
    generator: torch.Generator | None = None,
    check_finite_values: bool = True,
) -> tuple[torch.Tensor, TensorDict | None]:
    """Sample like :func:`~fluxguide.sampling.denoise` and return the final latent and every step's state.

    Args:
        model, img, img_ids, txt, txt_ids, vec, timesteps, guidance, guidance_model, guidance_scale: as in
            :func:`~fluxguide.sampling.denoise` (the loop never keeps a graph: collection is inference).
        save_states: record the states; ``False`` returns ``(latent, None)`` at no extra cost.
        noise_level: 0 runs the deterministic Euler loop (``denoise`` itself); ``a > 0`` runs the
            Flow-GRPO SDE step with ``sigma_t = a * sqrt(t / (1 - t))`` around the guided prediction.
        generator: draws the SDE noise (ignored when ``noise_level == 0``).
        check_finite_values: raise on NaN/inf predictions.

    Returns:
        ``(final_latent, states)``. ``states`` has batch size ``[B]`` and holds ``txt`` ``(B, L, D)``,
        ``vec`` ``(B, D)`` and, per step, ``img`` (the latent *before* the step), ``pred`` (the model's
        prediction), ``pred_used`` (what the sampler stepped with), ``t``, ``t_prev`` and ``step``
        (``(B, T)``), plus ``next_img`` for SDE trajectories.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0 (0 = deterministic Euler), got {noise_level}")
    records: list[dict[str, torch.Tensor]] = []

    def record(step_idx: int, t_curr: float, t_prev: float, x: torch.Tensor, pred: torch.Tensor,
               pred_used: torch.Tensor, next_x: torch.Tensor | None = None) -> None:
        if not save_states:
            return
        entry = {IMG: x.detach(), PRED: pred.detach(), PRED_USED: pred_used.detach()}
        if next_x is not None:
            entry[NEXT_IMG] = next_x.detach()
        records.append(entry)

    if noise_level == 0:
        final = denoise(
            model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=guidance, guidance_model=guidance_model,
            guidance_scale=guidance_scale, guidance_requires_grad=False, check_finite_values=check_finite_values,
            callback=record,
        )
    else:
        final = _sde_loop(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance, guidance_model,
                          guidance_scale, noise_level, generator, check_finite_values, record)
    if not save_states:
        return final, None
    return final, _stack_states(records, txt, vec, timesteps)


@torch.no_grad()
def _sde_loop(model: FluxModel, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
              vec: torch.Tensor, timesteps: Sequence[float], guidance: float | None,
              guidance_model: GuidanceFn | None, guidance_scale: GuidanceScale, noise_level: float,
              generator: torch.Generator | None, check_finite_values: bool, record) -> torch.Tensor:
    """The guided loop with Flow-GRPO's SDE step in place of the Euler step (the env's SDE mode)."""
    num_steps = check_timesteps(timesteps)
    check_guidance_scale(guidance_scale, num_steps)
    check_batch(img, txt, vec, img_ids)
    b = img.shape[0]
    g = None if guidance is None else torch.full((b,), guidance, device=img.device, dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(itertools.pairwise(timesteps)):
        scale = scale_at(guidance_scale, i, num_steps) if guidance_model is not None else 1.0
        pred, pred_used = guided_prediction(model, img, img_ids, txt, txt_ids, vec, g, t_curr, i, guidance_model, scale)
        if check_finite_values:
            check_finite("the model prediction", pred, i, t_curr)
            check_finite("the guided prediction", pred_used, i, t_curr)
        noise_device = img.device if generator is None else generator.device
        noise = torch.randn(img.shape, generator=generator, device=noise_device).to(img.device)
        new_img = sde_step(img.float(), pred_used.float(), t_curr, t_prev, noise_level, noise=noise).sample
        new_img = new_img.to(img.dtype)
        record(i, t_curr, t_prev, img, pred, pred_used, new_img)
        img = new_img
    return img


def _stack_states(records: list[dict[str, torch.Tensor]], txt: torch.Tensor, vec: torch.Tensor,
                  timesteps: Sequence[float]) -> TensorDict:
    """Per-step records -> one TensorDict ``[B]`` with a step dimension after the batch."""
    b, num_steps = txt.shape[0], len(records)
    device = records[0][IMG].device
    per_step = {k: torch.stack([r[k] for r in records], dim=1) for k in records[0]}
    times = torch.as_tensor([float(t) for t in timesteps], dtype=torch.float32, device=device)
    per_step[T] = times[:-1].expand(b, num_steps).clone()
    per_step[T_PREV] = times[1:].expand(b, num_steps).clone()
    per_step[STEP] = torch.arange(num_steps, device=device).expand(b, num_steps).clone()
    return TensorDict({**per_step, TXT: txt.detach(), VEC: vec.detach()}, batch_size=[b], device=device)
