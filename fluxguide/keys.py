"""TensorDict key names shared by the policies, the envs and the algorithms, declared once.

The observation of the denoising MDP (docs/design.md, "envs") is ``img``, ``pred``, ``txt``, ``vec``, ``t``
and ``step``; the action is the guidance correction, shaped like ``pred``. In SDE mode the env also publishes
``sde_std``: the std, in action units, that a Gaussian policy must use for the guided process to be the
marginal-preserving SDE step (see :func:`fluxguide.sampling.sde_action_std`).
"""

from __future__ import annotations

IMG = "img"
"""Current latent ``(B, seq, C)``."""
PRED = "pred"
"""The base model's velocity prediction at the current step ``(B, seq, C)``."""
TXT = "txt"
"""Text token features ``(B, L, D_txt)``."""
VEC = "vec"
"""Pooled text embedding ``(B, D_vec)``."""
T = "t"
"""Current time in [0, 1] (1 = noise), ``(B,)`` or ``(B, 1)``."""
STEP = "step"
"""Index of the current sampling step, ``(B,)`` or ``(B, 1)`` integers."""
SDE_STD = "sde_std"
"""Per-step policy std (action units) published by the env in SDE mode, ``(B,)`` or ``(B, 1)``."""

ACTION = "action"
"""The guidance correction, shaped like ``pred``."""
LOC = "loc"
"""Mean of the Gaussian policy (the guidance network's output)."""
SCALE = "scale"
"""Std of the Gaussian policy, broadcastable to the action (``(B, 1, 1)``)."""
BASIS = "basis"
"""Per-observation basis ``(*batch, K, seq, C)`` of a coefficient-space policy (:class:`SubspaceNormal`)."""
OFFSET = "offset"
"""The deterministic part ``(*batch, seq, C)`` of a coefficient-space action outside its explored coefficients
(the network under an explored affine head, :class:`SubspaceNormal`'s ``offset``)."""
LOG_PROB = "action_log_prob"
"""Where TorchRL's ``ProbabilisticActor`` writes the action's log-prob (torchrl 0.14's default)."""
STATE_VALUE = "state_value"
"""The critic's estimate ``(B, 1)``."""

OBSERVATION_KEYS: tuple[str, ...] = (IMG, PRED, TXT, VEC, T, STEP)
"""The observation keys, in the order guidance networks take them."""

__all__ = [
    "ACTION",
    "BASIS",
    "IMG",
    "LOC",
    "LOG_PROB",
    "OBSERVATION_KEYS",
    "OFFSET",
    "PRED",
    "SCALE",
    "SDE_STD",
    "STATE_VALUE",
    "STEP",
    "TXT",
    "VEC",
    "T",
]
