"""The Gaussian policy that makes guided sampling the marginal-preserving SDE step.

In SDE mode the env's step is deterministic given the action ``a`` (docs/design.md: after reset the only
randomness is the policy's): ``x' = sde_mean(img, pred + g a, t, t_prev)``. ``sde_mean`` is affine in its
prediction argument, ``x' = sde_mean(img, pred) + k a`` with ``k = g (1 + sigma_t^2 (1 - t) / (2 t)) dt``
(Flow-GRPO Eq. 9, ``dt = t_prev - t < 0``). So a Gaussian policy ``a ~ N(loc, s^2)`` makes
``x' ~ N(sde_mean(img, pred + g loc), (|k| s)^2)``, which is the SDE step of
:func:`fluxguide.sampling.sde_step` when ``s = sde_step_std / |k|``. Then, element-wise,

    log N(a; loc, s) = log N(x'; mean, sde_step_std) + log|k|

(the change of variables ``x' = x0 + k a``), so the summed action log-prob equals the summed SDE log-prob
plus ``seq * C * log|k|``, a constant that cancels in PPO's ratios.
"""

from __future__ import annotations

import math

import torch

from fluxguide.sampling.steps import sde_mean, sde_step_std


def sde_action_coefficient(
    t_curr: float, t_prev: float, noise_level: float, guidance_scale: float = 1.0
) -> float:
    """``k = d x' / d a``: how much one unit of action moves the next latent's mean.

    Read off :func:`fluxguide.sampling.sde_mean` itself (in float64, where it is exactly affine), so it
    follows that function's conventions (including its ``t = 1`` handling).
    """
    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    slope = sde_mean(zero, one, t_curr, t_prev, noise_level) - sde_mean(
        zero, zero, t_curr, t_prev, noise_level
    )
    return float(guidance_scale * slope)


def sde_action_std(t_curr: float, t_prev: float, noise_level: float, guidance_scale: float = 1.0) -> float:
    """The policy std (action units) that turns the guided step into the SDE step of ``noise_level``.

    What the env publishes as ``"sde_std"`` in SDE mode; ``sde_step_std(t_curr, t_prev, noise_level) / |k|``.
    """
    k = sde_action_coefficient(t_curr, t_prev, noise_level, guidance_scale)
    if k == 0:
        raise ValueError(
            f"guidance_scale={guidance_scale} makes the action ineffective (k = 0) at t={t_curr}: "
            "no policy std "
            "reproduces the SDE step; use a nonzero guidance_scale"
        )
    return sde_step_std(t_curr, t_prev, noise_level) / abs(k)


def sde_log_prob_offset(
    t_curr: float, t_prev: float, noise_level: float, num_elements: int, guidance_scale: float = 1.0
) -> float:
    """``sum log N(a; loc, s) - sum sde_step(...).log_prob`` over ``seq * C`` elements (the Jacobian)."""
    return num_elements * math.log(abs(sde_action_coefficient(t_curr, t_prev, noise_level, guidance_scale)))
