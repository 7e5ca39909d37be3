"""Gymnasium spaces of the guidance env, and the numpy conversion of its observations.

Gymnasium's ``Box`` stores ``low``, ``high`` and two boolean masks at full shape, so an unbounded Box for
Flux's ``txt`` (512 x 4096) holds 20 MB, and 640 MB batched over 32 envs. :class:`UnboundedBox` keeps them
as read-only broadcast views of one element each; every ``Box`` method reads them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from fluxguide import keys


class UnboundedBox(spaces.Box):
    """``Box(-inf, inf, shape, dtype)`` whose bounds are zero-stride views (no ``shape``-sized arrays)."""

    def __init__(self, shape: Sequence[int], dtype: type | np.dtype = np.float32, seed: int | None = None) -> None:
        super().__init__(low=-np.inf, high=np.inf, shape=(1,), dtype=dtype, seed=seed)
        shape = tuple(int(s) for s in shape)
        self._shape = shape
        self.low = _broadcast(self.low, shape)
        self.high = _broadcast(self.high, shape)
        self.bounded_below = _broadcast(self.bounded_below, shape)
        self.bounded_above = _broadcast(self.bounded_above, shape)


def _broadcast(one: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``one`` (a single element) viewed at ``shape`` with zero strides.

    Flagged writeable (unlike ``np.broadcast_to``) because ``torch.as_tensor`` (TorchRL's ``GymWrapper``
    reads the bounds that way) warns on read-only arrays; nothing writes to space bounds.
    """
    return np.lib.stride_tricks.as_strided(one, shape=shape, strides=(0,) * len(shape), writeable=True)


def observation_space(
    latent_shape: tuple[int, int],
    txt_shape: tuple[int, int],
    vec_shape: tuple[int],
    num_steps: int,
    sde: bool,
    batch: int | None = None,
) -> spaces.Dict:
    """The ``Dict`` observation space, per env (``batch=None``) or batched over ``batch`` envs.

    ``img``, ``pred``, ``txt``, ``vec`` are unbounded float32; ``t`` is ``(1,)`` in [0, 1], ``step`` ``(1,)``
    int64 in [0, num_steps] and, in SDE mode, ``sde_std`` ``(1,)`` >= 0.
    """
    lead = () if batch is None else (batch,)
    entries: dict[str, spaces.Space[Any]] = {
        keys.IMG: UnboundedBox((*lead, *latent_shape)),
        keys.PRED: UnboundedBox((*lead, *latent_shape)),
        keys.TXT: UnboundedBox((*lead, *txt_shape)),
        keys.VEC: UnboundedBox((*lead, *vec_shape)),
        keys.T: spaces.Box(0.0, 1.0, shape=(*lead, 1), dtype=np.float32),
        keys.STEP: spaces.Box(0, num_steps, shape=(*lead, 1), dtype=np.int64),
    }
    if sde:
        entries[keys.SDE_STD] = spaces.Box(0.0, np.inf, shape=(*lead, 1), dtype=np.float32)
    return spaces.Dict(entries)


def action_space(latent_shape: tuple[int, int], max_action: float, batch: int | None = None) -> spaces.Box:
    """``Box(-max_action, max_action)`` shaped like ``pred`` (per env, or batched)."""
    lead = () if batch is None else (batch,)
    return spaces.Box(-max_action, max_action, shape=(*lead, *latent_shape), dtype=np.float32)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A fresh host copy of ``x`` as numpy (floating tensors as float32, which numpy has for bf16 too).

    Always a copy: Gymnasium's users keep and may modify what an env returns, which must not touch the
    env's state (on a GPU the device-to-host transfer is this copy).
    """
    dtype = torch.float32 if x.dtype.is_floating_point else x.dtype
    return x.detach().to(device="cpu", dtype=dtype, copy=True).numpy()


def observation_to_numpy(obs: dict[str, torch.Tensor], index: int | None = None) -> dict[str, np.ndarray]:
    """The observation as numpy: batched, or the ``index``-th entry of the batch."""
    if index is None:
        return {k: to_numpy(v) for k, v in obs.items()}
    return {k: to_numpy(v[index]) for k, v in obs.items()}
