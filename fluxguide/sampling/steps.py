"""One sampler step: the deterministic Euler (ODE) step and the marginal-preserving SDE step.

Convention (docs/design.md): ``x_t = (1 - t) x0 + t * noise``, velocity ``v = noise - x0``, and a step goes
from ``t_curr`` to ``t_prev < t_curr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def euler_step(img: torch.Tensor, pred: torch.Tensor, t_curr: float, t_prev: float) -> torch.Tensor:
    """Flux's deterministic Euler step ``img + (t_prev - t_curr) * pred``."""
    return img + (t_prev - t_curr) * pred


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise log-density of ``N(mean, std^2)`` at ``x``, computed in float32 (or float64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean, std = x.to(dtype), mean.to(dtype), std.to(dtype)
    return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI


def sde_step_std(t_curr: float, t_prev: float, noise_level: float) -> float:
    """Standard deviation of the SDE step from ``t_curr`` to ``t_prev``.

    Flow-GRPO (Liu et al. 2025, Eq. 9): the diffusion coefficient is ``sigma_t = a * sqrt(t / (1 - t))``
    and the step's noise is ``sigma_t * sqrt(t_curr - t_prev)``. At ``t = 1`` the ratio diverges, so, as
    Flow-GRPO does, ``t_prev`` stands in for ``t`` in the denominator.
    """
    if t_prev >= t_curr:
        raise ValueError(f"an SDE step needs t_prev < t_curr, got t_curr={t_curr}, t_prev={t_prev}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    denom_t = t_prev if t_curr >= 1.0 else t_curr
    sigma_t = noise_level * math.sqrt(t_curr / (1.0 - denom_t))
    return sigma_t * math.sqrt(t_curr - t_prev)


@dataclass
class SDEStepOutput:
    """Result of :func:`sde_step`: the sample, its Gaussian mean and std, and the element-wise log-prob."""

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def sde_mean(img: torch.Tensor, pred: torch.Tensor, t_curr: float, t_prev: float, noise_level: float) -> torch.Tensor:
    """Mean of the marginal-preserving SDE step (the drift-corrected Euler step).

    Flow-GRPO Eq. 9: ``x + [v + sigma_t^2 / (2t) * (x + (1 - t) v)] * dt`` with ``dt = t_prev - t_curr``.
    With ``noise_level = 0`` this is exactly :func:`euler_step`.
    """
    if noise_level == 0:
        return euler_step(img, pred, t_curr, t_prev)
    denom_t = t_prev if t_curr >= 1.0 else t_curr
    sigma_sq = noise_level**2 * t_curr / (1.0 - denom_t)
    dt = t_prev - t_curr
    return img * (1 + sigma_sq / (2 * t_curr) * dt) + pred * (1 + sigma_sq * (1 - t_curr) / (2 * t_curr)) * dt


def sde_step(
    img: torch.Tensor,
    pred: torch.Tensor,
    t_curr: float,
    t_prev: float,
    noise_level: float = 0.7,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sample: torch.Tensor | None = None,
) -> SDEStepOutput:
    """One step of the marginal-preserving SDE of Flow-GRPO, with its Gaussian log-probability.

    Args:
        img: latent at ``t_curr``, shape ``(B, seq, C)``.
        pred: velocity used for the step (base prediction plus any guidance correction).
        t_curr, t_prev: the step goes from ``t_curr`` to ``t_prev < t_curr``.
        noise_level: ``a`` in ``sigma_t = a * sqrt(t / (1 - t))``; 0 gives the Euler step.
        noise: standard normal noise to use (drawn from ``generator`` if omitted).
        sample: evaluate the log-prob of this given next latent instead of drawing one (PPO's old actions).
            A drawn sample enters its own log-prob detached (the score-function convention); a given one
            is used as passed.

    Returns:
        :class:`SDEStepOutput`; ``log_prob`` is element-wise (reduce it by mean or sum as the caller needs)
        and computed in float32. With ``noise_level = 0`` the step is deterministic and ``log_prob`` is 0.
    """
    std_value = sde_step_std(t_curr, t_prev, noise_level)  # validates the times before sde_mean divides by t
    mean = sde_mean(img, pred, t_curr, t_prev, noise_level)
    std = torch.full((), std_value, dtype=torch.promote_types(img.dtype, torch.float32), device=img.device)
    action = sample
    if sample is None:
        if std_value == 0:
            sample = mean
        else:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            sample = mean + std_value * noise
        # The drawn sample is the action: a constant in its log-prob (as in Flow-GRPO), so the score
        # d log p / d mean = (sample - mean) / std^2 reaches the policy. The returned ``sample`` keeps its
        # reparameterised graph for reward gradients.
        action = sample.detach()
    if std_value == 0:
        log_prob = torch.zeros_like(mean, dtype=std.dtype)
    else:
        log_prob = gaussian_log_prob(action, mean, std)
    return SDEStepOutput(sample=sample, mean=mean, std=std, log_prob=log_prob)
