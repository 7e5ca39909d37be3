"""The env's actions: their default bounds and the one validation every face shares."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: Default action bound in ODE mode: far above any useful velocity correction (|pred| is a few units),
#: so it only guards against blow-ups.
DEFAULT_ODE_MAX_ACTION = 10.0
#: In SDE mode the default bound is this many of the largest published ``sde_std``, so a Gaussian policy
#: with that std is clipped with probability ~2e-9 per element.
SDE_MAX_ACTION_STDS = 6.0


def finite(name: str, value: float) -> float:
    """``value`` as a float; a ValueError naming ``name`` if it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_action(
    action: Any, expected: tuple[int, ...], device: torch.device, *, step: int | None = None,
    name: str = "action",
) -> torch.Tensor:
    """Validate an action (tensor or numpy array) and return it as float32 on the core's device.

    Raises:
        TypeError: not an array, or not a floating dtype.
        ValueError: wrong shape, or NaN / inf entries.
    """
    if isinstance(action, np.ndarray):
        if action.dtype.kind != "f":
            raise TypeError(
                f"{name} must be a floating array (float32), got dtype {action.dtype}: the action is a "
                f"velocity correction shaped like pred"
            )
        action = torch.from_numpy(np.ascontiguousarray(action))
    if not isinstance(action, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(action).__name__}")
    if not action.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating tensor (float32), got dtype {action.dtype}: the action is a "
            f"velocity correction shaped like pred"
        )
    if tuple(action.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(action.shape)}, expected {expected} (batch, seq, C): one correction "
            f"per latent token, shaped like pred"
        )
    action = action.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(action)
    if bool(bad.any()):  # the one host sync of a step: a NaN must not enter the trajectory silently
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN/inf values (of {action.numel()}) at step {step}: "
            f"check the policy's outputs (and its learning rate)"
        )
    return action
