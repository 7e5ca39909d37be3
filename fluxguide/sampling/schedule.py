"""Flux's timestep schedule.

Follows the formula of Black Forest Labs' ``flux.sampling.get_schedule``
(black-forest-labs/flux, ``src/flux/sampling.py``): a linspace from 1 (noise) to 0 (data), warped by
``time_shift`` with a shift ``mu`` that grows linearly with the number of image tokens, so that larger
images spend more steps at high noise (Esser et al. 2024, "Scaling Rectified Flow Transformers", §5.3.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """Shift timesteps ``t`` in (0, 1]: ``e^mu / (e^mu + (1/t - 1)^sigma)``."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    """The line through ``(x1, y1)`` and ``(x2, y2)``: maps an image sequence length to the shift ``mu``."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """Return the ``num_steps + 1`` times ``1 = t_0 > t_1 > ... > t_N = 0`` of Flux's sampler.

    Args:
        num_steps: number of sampling steps (at least 1).
        image_seq_len: number of packed latent tokens (Flux: ``(H/16) * (W/16)``).
        base_shift: shift ``mu`` at 256 tokens.
        max_shift: shift ``mu`` at 4096 tokens.
        shift: apply the resolution-dependent shift; ``False`` gives a plain linspace.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len!r}")
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()
