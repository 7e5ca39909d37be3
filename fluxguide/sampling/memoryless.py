"""The memoryless noise schedule of rectified flow and its sampler step (Adjoint Matching's base process).

Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with
Memoryless Stochastic Optimal Control", ICLR 2025 (arXiv 2409.08861), Sec. 3-4.

**Time.** The paper's time ``tau`` runs from noise (``tau = 0``) to data (``tau = 1``) with the interpolant
``X_tau = beta_tau X_0 + alpha_tau X_1`` (``X_0`` noise, ``X_1`` data); rectified flow is ``alpha_tau = tau``,
``beta_tau = 1 - tau``. fluxguide's ``t`` is ``1 - tau`` (``t = 1`` noise, ``t = 0`` data,
``x_t = (1 - t) x0 + t noise``) and its velocity is the paper's with the sign flipped (``v = noise - x0``).

**The memoryless schedule** (the paper's ``sigma(tau) = sqrt(2 eta_tau)`` with
``eta_tau = beta_tau (alphȧ_tau / alpha_tau beta_tau - betȧ_tau)``) is, for rectified flow,
``eta = (1 - tau) / tau``, i.e. ``sigma(t)^2 = 2 t / (1 - t)`` in fluxguide's time (:func:`memoryless_sigma`).
The family of SDEs with velocity ``v`` and diffusion ``sigma`` then has the drift (paper, the flow-matching
SDE family) ``b = v_paper + sigma^2 / (2 eta) (v_paper - alphȧ/alpha x) = 2 v_paper - x / tau``; in fluxguide's
time, a step from ``t`` to ``t - dt`` is ``x + dt (-2 v - x / (1 - t)) + sigma(t) sqrt(dt) xi``: Flow-GRPO's SDE
(:func:`fluxguide.sampling.sde_mean`) with ``noise_level = sqrt(2)``. "Memoryless" means ``X_{tau=0}`` and
``X_{tau=1}`` are independent, the condition under which the controlled process samples the reward-tilted
distribution.

**Discretisation.** ``sigma`` diverges at ``t = 1`` and vanishes at ``t = 0``, so Euler-Maruyama is wrong on the
first step. :func:`memoryless_coefficients` uses the exact transition the memoryless process has when the data
are a point mass (the DDPM / DDIM ``eta = 1`` posterior step ``q(x_s | x_t, x0_hat)`` with
``x0_hat = x - t v``), which is finite at both ends and tends to the SDE above as the step shrinks.

**Control as a guidance correction.** The controlled SDE is ``dX = (b + sigma u) dtau + sigma dB`` (the paper's
control-affine SDE). With ``b = 2 v_paper - x / tau``, adding ``sigma u`` to the drift is adding ``sigma u / 2``
to ``v_paper``, i.e. ``-sigma u / 2`` to fluxguide's velocity: the policy's correction ``g * c`` (``pred_used =
pred + g c``) *is* the control, ``u = -2 g c / sigma(t)`` (:func:`correction_to_control`). The fine-tuned
velocity ``v + g c`` is then an ordinary flow model (the paper's point): the deterministic Euler sampler with the
same correction samples the same tilted distribution.
"""

from __future__ import annotations

import math

import torch

__all__ = ["correction_to_control", "memoryless_coefficients", "memoryless_sigma", "memoryless_step"]


def memoryless_sigma(t: float) -> float:
    """The memoryless diffusion coefficient ``sigma(t) = sqrt(2 t / (1 - t))`` (fluxguide time; ``inf`` at t=1)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return math.inf if t >= 1.0 else math.sqrt(2.0 * t / (1.0 - t))


def memoryless_coefficients(t_curr: float, t_prev: float) -> tuple[float, float, float]:
    """``(A, B, std)`` of the memoryless step from ``t_curr`` to ``t_prev < t_curr``:
    ``x_prev = A x + B v + std * xi`` with ``xi ~ N(0, I)``.

    The posterior of ``x_s`` given ``x_t`` and the predicted data ``x0 = x - t v`` under the forward kernel
    ``x_t = rho x_s + sqrt(t^2 - rho^2 s^2) z``, ``rho = (1 - t) / (1 - s)``: mean
    ``(1 - s)(1 - rho^2 s^2 / t^2) x0 + rho s^2 / t^2 x``, variance ``s^2 (t^2 - rho^2 s^2) / t^2``. At ``t = 1`` it
    draws a fresh ``(1 - s) x0 + s xi`` (memoryless); at ``s = 0`` it returns ``x0``. For small steps
    ``B -> -2 dt`` and ``std^2 -> sigma(t)^2 dt``, the SDE of the module docstring.
    """
    t, s = float(t_curr), float(t_prev)
    if not 0.0 <= s < t <= 1.0:
        raise ValueError(f"a memoryless step needs 0 <= t_prev < t_curr <= 1, got t_curr={t_curr}, t_prev={t_prev}")
    rho = (1.0 - t) / (1.0 - s)
    kept = 1.0 - (rho * s / t) ** 2  # (t^2 - rho^2 s^2) / t^2: the share of x0 in the mean
    a_x0 = (1.0 - s) * kept
    a_x = rho * s * s / (t * t)
    return a_x + a_x0, -t * a_x0, s * math.sqrt(max(kept, 0.0))


def memoryless_step(
    img: torch.Tensor, pred: torch.Tensor, t_curr: float, t_prev: float, *,
    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One memoryless SDE step with velocity ``pred`` (base prediction plus any guidance correction), in float32."""
    a, b, std = memoryless_coefficients(t_curr, t_prev)
    out = a * img.float() + b * pred.float()
    if std > 0:
        if noise is None:
            noise = torch.randn(out.shape, generator=generator, device=generator.device if generator else out.device)
        out = out + std * noise.to(out.device, torch.float32)
    return out


def correction_to_control(correction: torch.Tensor, t: float, guidance_scale: float = 1.0) -> torch.Tensor:
    """The paper's control ``u = -2 g c / sigma(t)`` of a guidance correction ``c`` applied with scale ``g``.

    Its running cost ``0.5 ||u||^2 dtau`` is the KL rate of the controlled process to the base process
    (Girsanov); at ``t = 1`` (``sigma = inf``) the control is 0."""
    sigma = memoryless_sigma(t)
    return torch.zeros_like(correction) if math.isinf(sigma) else -2.0 * guidance_scale * correction / sigma
