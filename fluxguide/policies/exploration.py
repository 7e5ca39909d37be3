"""PPO's actor: which space it explores, with what std, and from which time (docs/guide.md, "Exploring with PPO").

:func:`make_ppo_actor` is the one place that decides, for ``train_ppo.py`` and for Python users alike: an affine
schedule (alone or as the head of a network) explores its few coefficients in ODE mode; anything else explores
the whole correction, with the SDE's own noise in SDE mode, or a Gaussian of fixed or learned std in ODE mode
(coarse noise with ``coarse``), only where the policy acts (``explore_min_t``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn
from torchrl.modules import ProbabilisticActor

from fluxguide.policies.actors import is_coefficient_policy, make_coefficient_actor, make_probabilistic_actor

if TYPE_CHECKING:
    from fluxguide.backbones.base import Backbone

#: The default std of each explored affine coefficient (a coefficient of 1 doubles ``img`` or ``pred``).
COEFFICIENT_STD = 1.0
#: The default std of an explored correction, per element (ODE mode).
CORRECTION_STD = 0.1

ExplorationSpace = Literal["coefficients", "correction", "coarse correction"]


@dataclass(frozen=True)
class Exploration:
    """What a PPO actor explores, as :func:`make_ppo_actor` built it.

    Attributes:
        space: ``"coefficients"`` (the affine schedule's ``2 * channels`` per step, :class:`SubspaceNormal`),
            ``"correction"`` (the whole correction) or ``"coarse correction"`` (one number per token and channel).
        std: the std (the initial one when learned); ``None``: the SDE's own per-step std (SDE mode).
        learn_std: whether one log-std parameter is learned.
        explore_min_t: exploration only at times ``t >= explore_min_t`` (whole corrections in ODE mode; the
            coefficient actor reads where the schedule acts from the policy itself).
    """

    space: ExplorationSpace
    std: float | None
    learn_std: bool
    explore_min_t: float

    def __str__(self) -> str:
        std = "the SDE's std" if self.std is None else f"{'initial ' if self.learn_std else ''}std {self.std:g}"
        where = f" at t >= {self.explore_min_t:g}" if self.explore_min_t > 0 else ""
        return f"explores the {self.space} with {std}{where}"


def make_ppo_actor(
    policy: nn.Module,
    backbone: Backbone,
    *,
    mode: Literal["sde", "ode"] = "ode",
    std: float | None = None,
    learn_std: bool = False,
    explore_coefficients: bool = True,
    coarse: bool = False,
    log_prob_reduction: Literal["mean", "sum"] = "mean",
    explore_min_t: float = 0.0,
) -> tuple[ProbabilisticActor, Exploration]:
    """PPO's Gaussian actor around ``policy``, and a description of what it explores.

    Args:
        policy: the guidance network (built with ``coarse`` when ``coarse`` is set: ``build_policy(...,
            coarse=True)`` wraps it in :class:`~fluxguide.policies.CoarseGuidance`).
        backbone: the base model (its image channels per token, for coarse noise).
        mode: the env's sampler: ``"sde"`` explores with the SDE's own noise (Flow-GRPO; ``std`` and
            ``learn_std`` unused), ``"ode"`` with a Gaussian of std ``std``.
        std: the std in ODE mode (the initial std when learned); default :data:`COEFFICIENT_STD` on explored
            coefficients, :data:`CORRECTION_STD` on whole corrections.
        learn_std: learn one log-std parameter (ODE mode).
        explore_coefficients: in ODE mode without ``coarse``, explore an affine policy, or a network under an affine
            head, in the schedule's coefficients (:func:`~fluxguide.policies.make_coefficient_actor`); other
            policies and modes explore the whole correction.
        coarse: explore (and correct) with coarse corrections (ODE mode).
        log_prob_reduction: ``"mean"`` or ``"sum"`` of the per-element log-density.
        explore_min_t: in ODE mode on whole corrections, explore only at ``t >= explore_min_t``: pass the policy's
            ``min_t``.

    Raises:
        ValueError: an unknown ``mode``, or ``coarse`` in SDE mode (the SDE's noise is full-resolution).
    """
    if mode not in ("sde", "ode"):
        raise ValueError(f"mode must be 'sde' or 'ode', got {mode!r}")
    ode = mode == "ode"
    if explore_coefficients and ode and not coarse and is_coefficient_policy(policy):
        std = COEFFICIENT_STD if std is None else std
        actor = make_coefficient_actor(policy, std=std, learn_std=learn_std, log_prob_reduction=log_prob_reduction)
        return actor, Exploration("coefficients", std, learn_std, 0.0)
    std = CORRECTION_STD if std is None else std
    explore_min_t = explore_min_t if ode else 0.0
    actor = make_probabilistic_actor(policy, std=std, learn_std=learn_std and ode, use_sde_std=not ode,
                                     log_prob_reduction=log_prob_reduction,
                                     coarse_channels=backbone.image_channels if coarse else None,
                                     explore_min_t=explore_min_t)
    return actor, Exploration("coarse correction" if coarse else "correction", std if ode else None,
                              learn_std and ode, explore_min_t)
