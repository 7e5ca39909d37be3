"""The seed's instrumented sampler: ``denoise`` that also returns the state of every step.

``denoise_with_state_collection`` runs :func:`fluxguide.sampling.denoise` itself (through its ``callback``, so
the final latent is bit for bit the same) and records, for every step, the observation a guidance model sees and
what the sampler did with it. With ``noise_level > 0`` the loop's step (``step_fn``) is the marginal-preserving
SDE step of Flow-GRPO instead of Euler's (the noisy trajectories that best-of-N data collection draws).

The states come back as one :class:`~tensordict.TensorDict` with batch size ``[B]``: per-step entries
carry a step dimension after the batch (``img`` is ``(B, T, seq, C)``) and the per-episode constants
``txt`` / ``vec`` are kept once per sample, not once per step (docs/design.md, "envs").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict

from fluxguide.sampling.denoise import FluxModel, GuidanceFn, GuidanceScale, StepFn, denoise
from fluxguide.sampling.steps import euler_step, sde_step

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
               pred_used: torch.Tensor) -> None:
        if save_states:
            records.append({IMG: x.detach(), PRED: pred.detach(), PRED_USED: pred_used.detach()})

    step_fn = euler_step if noise_level == 0 else _sde_step_fn(noise_level, generator)
    final = denoise(
        model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=guidance, guidance_model=guidance_model,
        guidance_scale=guidance_scale, guidance_requires_grad=False, check_finite_values=check_finite_values,
        callback=record, step_fn=step_fn,
    )
    if not save_states:
        return final, None
    if noise_level > 0:  # the latent after each step: the next step's latent before it, then the final one
        for before, after in zip(records, [*records[1:], {IMG: final.detach()}]):
            before[NEXT_IMG] = after[IMG]
    return final, _stack_states(records, txt, vec, timesteps)


def _sde_step_fn(noise_level: float, generator: torch.Generator | None) -> StepFn:
    """Flow-GRPO's SDE step around the guided prediction (the env's SDE mode), in float32, with noise drawn from
    ``generator`` on its device."""

    def step(img: torch.Tensor, pred_used: torch.Tensor, t_curr: float, t_prev: float) -> torch.Tensor:
        noise_device = img.device if generator is None else generator.device
        noise = torch.randn(img.shape, generator=generator, device=noise_device).to(img.device)
        return sde_step(img.float(), pred_used.float(), t_curr, t_prev, noise_level, noise=noise).sample.to(img.dtype)

    return step


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
