"""Guidance models as TorchRL policies: a deterministic actor, a Gaussian ``ProbabilisticActor``.

The same network serves reward-gradient and behaviour cloning (deterministic: ``action = model(obs)``) and
PPO (stochastic: ``action ~ N(model(obs), scale^2)``, with ``scale`` fixed, learned, or the env's SDE std).
Keys come from :mod:`fluxguide.keys`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from tensordict.nn import InteractionType, TensorDictModule
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import TensorSpec
from torchrl.modules import ProbabilisticActor

from fluxguide import keys
from fluxguide.policies.affine import AffineGuidance
from fluxguide.policies.composite import GuidancePart, guidance_parts
from fluxguide.policies.distributions import CoarseNormal, ReducedNormal, SubspaceNormal, check_reduction


def _flat_per_sample(x: torch.Tensor, batch_shape: torch.Size, what: str) -> torch.Tensor:
    """A per-sample scalar given as ``batch``, ``batch + (1,)`` or one value -> ``(prod(batch),)``."""
    n = batch_shape.numel()
    if x.numel() == 1:
        return x.reshape(1).expand(n)
    if x.shape not in (batch_shape, batch_shape + (1,)):
        raise ValueError(
            f"{what} must be shaped {tuple(batch_shape)} or {tuple(batch_shape) + (1,)}, got {tuple(x.shape)}"
        )
    return x.reshape(n)


def _fixed_or_learned_std(std: float, learn_std: bool) -> tuple[float, nn.Parameter | None]:
    """Check a policy std and return it with its ``log std`` parameter when learned (else ``None``)."""
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"std must be a positive finite number, got {std}")
    return float(std), nn.Parameter(torch.tensor(math.log(std))) if learn_std else None


def _current_std(std: float, log_std: nn.Parameter | None, device: torch.device) -> torch.Tensor:
    """The std now, a float32 scalar: the learned one if there is one, else the fixed one."""
    return log_std.float().exp() if log_std is not None else torch.tensor(std, device=device)


class Observation(NamedTuple):
    """The six observation tensors a policy reads, in the order of :data:`fluxguide.keys.OBSERVATION_KEYS`."""

    img: torch.Tensor
    pred: torch.Tensor
    txt: torch.Tensor
    vec: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor


class ObservationModule(nn.Module, ABC):
    """A module TorchRL calls with the observation tensors, in key order, then any extra keys it reads (a
    ``TensorDictModule`` passes them positionally); subclasses implement :meth:`read`."""

    def forward(self, *tensors: torch.Tensor | None) -> Any:
        """TorchRL's call: the :class:`Observation`'s tensors in key order, then the extra keys' values."""
        observed = len(Observation._fields)
        return self.read(Observation._make(tensors[:observed]), *tensors[observed:])

    @abstractmethod
    def read(self, obs: Observation, *extra: torch.Tensor | None) -> Any:
        """The module's output for ``obs`` (and the extra keys)."""


class ObservationAdapter(ObservationModule):
    """Run a guidance-signature model on TensorDict observations with any leading batch dims.

    TorchRL hands policies ``img`` of shape ``(*batch, seq, C)`` (``batch`` = ``[B]`` in a rollout step,
    ``[B, T]`` on a stored trajectory), ``t`` and ``step`` as ``(*batch,)`` or ``(*batch, 1)``, and
    ``txt`` / ``vec`` with the same leading dims (or broadcastable to them). Guidance models take one
    flat batch; this flattens, calls, and restores the leading dims.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def read(self, obs: Observation, *extra: torch.Tensor | None) -> torch.Tensor:
        img, pred, txt, vec, t, step = obs
        if img.ndim < 3:
            raise ValueError(f"img must be packed latents (*batch, seq, C), got shape {tuple(img.shape)}")
        batch_shape = img.shape[:-2]
        n = batch_shape.numel()
        try:
            txt_flat = txt.expand(batch_shape + txt.shape[-2:]).reshape(n, *txt.shape[-2:])
            vec_flat = vec.expand(batch_shape + vec.shape[-1:]).reshape(n, vec.shape[-1])
        except RuntimeError as e:
            raise ValueError(
                f"txt {tuple(txt.shape)} and vec {tuple(vec.shape)} must have the leading dims of img "
                f"{tuple(batch_shape)} (or broadcast to them)"
            ) from e
        out = self.model(
            img.reshape(n, *img.shape[-2:]),
            pred.reshape(n, *pred.shape[-2:]),
            txt_flat,
            vec_flat,
            _flat_per_sample(t, batch_shape, "t"),
            _flat_per_sample(step, batch_shape, "step").long(),
        )
        return out.reshape(*batch_shape, *out.shape[1:])


class GaussianHead(ObservationModule):
    """Observation -> ``(loc, scale)`` of the Gaussian policy; ``loc`` is the guidance model's correction.

    ``scale`` has shape ``(*batch, 1, 1)``: one std per sample, broadcast over ``(seq, C)`` (storing a full
    action-sized std per step would double rollout memory).

    Args:
        model: the guidance model.
        std: the fixed std, or the initial std when learned.
        learn_std: learn ``log std`` (one scalar parameter).
        use_sde_std: read the std from the observation's ``sde_std`` (the env's SDE mode; 0 at the steps outside
            its ``sde_window``, where the action is the mean).
        explore_min_t: explore only at times ``t >= explore_min_t`` (1 = noise): the std is 0 at later steps,
            where the action is the mean and adds nothing to log-probs (a policy built with ``min_t`` outputs
            zero there, so noise would only blur the reward). Not with ``use_sde_std`` (the SDE's noise is
            the sampler's own).
    """

    def __init__(
        self, model: nn.Module, std: float = 0.1, learn_std: bool = False, use_sde_std: bool = False,
        explore_min_t: float = 0.0,
    ) -> None:
        super().__init__()
        if learn_std and use_sde_std:
            raise ValueError(
                "learn_std and use_sde_std are exclusive: the SDE std is set by the env, not learned"
            )
        if not 0.0 <= explore_min_t < 1.0:
            raise ValueError(f"explore_min_t must be in [0, 1) (explore at t >= explore_min_t), got {explore_min_t}")
        if explore_min_t > 0 and use_sde_std:
            raise ValueError(
                "explore_min_t with use_sde_std: in SDE mode the exploration is the sampler's own noise at every "
                "step; restrict exploration in ODE mode (a fixed or learned std)"
            )
        self.explore_min_t = float(explore_min_t)
        self.net = ObservationAdapter(model)
        self.use_sde_std = use_sde_std
        # In SDE mode the std comes from the env; ``std`` is then unused (any value is accepted).
        self.std, self.log_std = (float(std), None) if use_sde_std else _fixed_or_learned_std(std, learn_std)

    def read(self, obs: Observation, sde_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``; ``sde_std`` is the observation's SDE std (read with ``use_sde_std``)."""
        loc = self.net(*obs)
        batch_shape = loc.shape[:-2]
        if self.use_sde_std:
            if sde_std is None:
                raise ValueError(
                    f"use_sde_std=True needs the observation key {keys.SDE_STD!r} (the env in SDE mode)"
                )
            scale = _flat_per_sample(sde_std, batch_shape, keys.SDE_STD).float()
            if not bool((scale >= 0).all()):  # 0: a step outside the env's sde_window, deterministic
                raise ValueError(
                    f"{keys.SDE_STD} must be >= 0, got {scale.min().item():.3g}: publish the SDE std of each "
                    "sample (the env in SDE mode does)"
                )
            scale = scale.reshape(*batch_shape, 1, 1)
        else:
            scale = _current_std(self.std, self.log_std, loc.device).expand(*batch_shape, 1, 1)
        if self.explore_min_t > 0:
            explore = _flat_per_sample(obs.t, batch_shape, keys.T) >= self.explore_min_t
            scale = scale * explore.reshape(*batch_shape, 1, 1).to(scale.dtype)
        return loc, scale


def make_deterministic_actor(
    model: nn.Module,
    observation_keys: Sequence[NestedKey] = keys.OBSERVATION_KEYS,
    action_key: NestedKey = keys.ACTION,
) -> TensorDictModule:
    """``action = model(img, pred, txt, vec, t, step)`` as a ``TensorDictModule`` (reward-gradient, BC).

    Args:
        model: a guidance model (any module with the guidance call signature).
        observation_keys: the six observation keys, in the order ``img, pred, txt, vec, t, step``.
        action_key: where to write the correction.
    """
    return TensorDictModule(ObservationAdapter(model), in_keys=list(observation_keys), out_keys=[action_key])


def make_probabilistic_actor(
    model: nn.Module,
    std: float = 0.1,
    learn_std: bool = False,
    use_sde_std: bool = False,
    log_prob_reduction: Literal["mean", "sum"] = "mean",
    *,
    coarse_channels: int | None = None,
    explore_min_t: float = 0.0,
    return_log_prob: bool = True,
    default_interaction_type: InteractionType = InteractionType.RANDOM,
    spec: TensorSpec | None = None,
    observation_keys: Sequence[NestedKey] = keys.OBSERVATION_KEYS,
    sde_std_key: NestedKey = keys.SDE_STD,
) -> ProbabilisticActor:
    """A Gaussian ``ProbabilisticActor`` around a guidance model (PPO).

    Writes ``loc``, ``scale``, ``action`` and (with ``return_log_prob``) ``action_log_prob``: ONE number per
    sample, the log-density reduced over ``(seq, C)`` by ``log_prob_reduction`` (see :class:`ReducedNormal`).

    Args:
        model: the guidance model; its output is the mean correction (zero for a new model).
        std: the fixed std, or the initial std when ``learn_std``.
        learn_std: learn one log-std parameter.
        use_sde_std: take the std from the observation's ``sde_std`` (env in SDE mode; see
            :func:`fluxguide.sampling.sde_action_std` for what the env must publish).
        log_prob_reduction: ``"mean"`` (default; sane PPO ratios at high dimension) or ``"sum"`` (exact).
        coarse_channels: explore with coarse noise, constant over each token's packed pixels, and act with
            the coarse projection of the mean (:class:`CoarseNormal`; wrap ``model`` in
            :class:`fluxguide.policies.coarse.CoarseGuidance` so its deterministic correction is the same). The
            image/latent channels per token: 3 in the shapes world, 16 in Flux. Not with ``use_sde_std``.
        explore_min_t: explore only at times ``t >= explore_min_t`` (see :class:`GaussianHead`); pass the
            policy's ``min_t``.
        return_log_prob: write the log-prob of the sampled action.
        default_interaction_type: ``RANDOM`` samples (exploration, SDE); under TorchRL's
            ``set_exploration_type(DETERMINISTIC)`` the actor returns the mean.
        spec: the env's action spec, if any.
        observation_keys: the six observation keys, in the order ``img, pred, txt, vec, t, step``.
        sde_std_key: where the env publishes the SDE std.
    """
    check_reduction(log_prob_reduction)
    if coarse_channels is not None and use_sde_std:
        raise ValueError(
            "coarse_channels with use_sde_std: the SDE's noise is full-resolution, so its step cannot be a coarse "
            "Gaussian; use coarse exploration in ODE mode (a fixed or learned std)"
        )
    head = GaussianHead(model, std=std, learn_std=learn_std, use_sde_std=use_sde_std, explore_min_t=explore_min_t)
    in_keys = list(observation_keys) + ([sde_std_key] if use_sde_std else [])
    return _actor(
        TensorDictModule(head, in_keys=in_keys, out_keys=[keys.LOC, keys.SCALE]),
        [keys.LOC, keys.SCALE],
        ReducedNormal if coarse_channels is None else CoarseNormal,
        {"reduction": log_prob_reduction}
        | ({"event_dims": 2} if coarse_channels is None else {"channels": int(coarse_channels)}),
        return_log_prob,
        default_interaction_type,
        spec,
    )


def _actor(
    module: TensorDictModule,
    dist_keys: list[NestedKey] | dict[str, NestedKey],
    distribution_class: type,
    distribution_kwargs: dict[str, object],
    return_log_prob: bool,
    default_interaction_type: InteractionType,
    spec: TensorSpec | None,
) -> ProbabilisticActor:
    """The ``ProbabilisticActor`` that samples ``action`` from ``module``'s distribution parameters
    (``dist_keys``) and writes its log-prob to :data:`fluxguide.keys.LOG_PROB`."""
    return ProbabilisticActor(
        module,
        in_keys=dist_keys,
        out_keys=[keys.ACTION],
        spec=spec,
        distribution_class=distribution_class,
        distribution_kwargs=distribution_kwargs,
        return_log_prob=return_log_prob,
        log_prob_key=keys.LOG_PROB,
        default_interaction_type=default_interaction_type,
    )


def _unit(part: GuidancePart, combine: str) -> bool:
    """Whether ``part`` adds its model's correction unchanged at every step (up to a lower time bound)."""
    return combine in ("sum", "first") and part.weight == 1.0 and part.steps is None and (
        part.times is None or part.times[1] == 1.0)


def _affine_parts(policy: nn.Module) -> tuple[AffineGuidance, float]:
    """The :class:`AffineGuidance` of ``policy`` and the time from which it acts: the schedule itself, or a
    composite of that one part (its ``min_t`` wrapper), read from the composite's declared parts."""
    if isinstance(policy, AffineGuidance):
        return policy, 0.0
    parts = guidance_parts(policy)
    if len(parts) == 1 and _unit(parts[0], policy.combine) and isinstance(parts[0].model, AffineGuidance):
        return parts[0].model, parts[0].times[0] if parts[0].times is not None else 0.0
    raise TypeError(
        f"coefficient exploration needs an AffineGuidance policy (build_policy('affine', ...), optionally with "
        f"min_t), or a network under an affine head (MultiObjectiveGuidance([network, affine]), as "
        f"PolicyConfig(head='affine') builds it), got {type(policy).__name__}"
    )


def coefficient_parts(policy: nn.Module) -> tuple[nn.Module | None, AffineGuidance, float]:
    """``(body, affine, min_t)`` of a policy whose exploration can live in affine coefficients: an affine
    schedule alone (``body`` is ``None``), or a network under an affine head (a composite that sums two parts
    acting everywhere with unit weights, ``MultiObjectiveGuidance([body, head])``, the head last), whose
    correction is then the deterministic offset."""
    parts = guidance_parts(policy)
    if (len(parts) == 2 and policy.combine == "sum"
            and all(part.everywhere and part.weight == 1.0 for part in parts)):
        affine, min_t = _affine_parts(parts[1].model)
        return parts[0].model, affine, min_t
    affine, min_t = _affine_parts(policy)
    return None, affine, min_t


def is_coefficient_policy(policy: nn.Module) -> bool:
    """Whether :func:`make_coefficient_actor` can explore ``policy`` in its affine coefficients."""
    try:
        coefficient_parts(policy)
    except TypeError:
        return False
    return True


class CoefficientHead(ObservationModule):
    """Observation -> ``(coefficients, scale, basis[, offset])`` of a :class:`SubspaceNormal` for an affine policy.

    The coefficients are the policy's ``a(t), b(t)`` (zero before its ``min_t``), the basis its
    :meth:`AffineGuidance.basis` of the observation, and the std is 0 (no exploration) where the policy does
    not act. Under an affine head (:func:`coefficient_parts`) the network's correction is the offset: PPO
    explores the head's few coefficients, and the network learns through the density of the residual (the
    action less its correction, read in the head's basis), so the policy gradient's noise stays as low as the
    affine schedule's.
    """

    def __init__(self, policy: nn.Module, std: float = 0.1, learn_std: bool = False) -> None:
        super().__init__()
        body, self.affine, self.min_t = coefficient_parts(policy)  # the wrappers hold no parameters
        self.body = None if body is None else ObservationAdapter(body)
        self.std, self.log_std = _fixed_or_learned_std(std, learn_std)

    def read(self, obs: Observation, *extra: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        img, pred = obs.img, obs.pred
        if img.ndim < 3 or img.shape != pred.shape or img.shape[-1] != self.affine.latent_channels:
            raise ValueError(
                f"img and pred must be packed latents (*batch, seq, {self.affine.latent_channels}), got "
                f"{tuple(img.shape)} and {tuple(pred.shape)}"
            )
        batch_shape = img.shape[:-2]
        times = _flat_per_sample(obs.t, batch_shape, keys.T).float()
        acts = (times >= self.min_t).float().unsqueeze(-1)
        coefficients = (self.affine.coefficients_at(times).float() * acts).reshape(*batch_shape, -1)
        scale = (_current_std(self.std, self.log_std, img.device) * acts).reshape(*batch_shape, 1)
        out = (coefficients, scale, self.affine.basis(img, pred))
        if self.body is None:
            return out
        return (*out, self.body(*obs))


def make_coefficient_actor(
    policy: nn.Module,
    std: float = 0.1,
    learn_std: bool = False,
    log_prob_reduction: Literal["mean", "sum"] = "mean",
    *,
    return_log_prob: bool = True,
    default_interaction_type: InteractionType = InteractionType.RANDOM,
    spec: TensorSpec | None = None,
    observation_keys: Sequence[NestedKey] = keys.OBSERVATION_KEYS,
) -> ProbabilisticActor:
    """A ``ProbabilisticActor`` that explores in the coefficients of an :class:`AffineGuidance` policy (PPO).

    ``action = sum_k c_k basis_k`` with ``c ~ N(policy coefficients, std^2)``: ``2 * channels`` dimensions per
    step instead of the whole latent (:class:`SubspaceNormal`), none where the policy does not act (its
    ``min_t``). The deterministic action is the policy's own correction, so the saved policy samples as it
    was trained. Writes ``loc`` (the coefficients), ``scale``, ``basis``, ``action`` and ``action_log_prob``.
    A network under an affine head (``PolicyConfig(head="affine")``: RL from a distilled start) explores the
    same way, the network's correction added as the deterministic ``offset`` (also written): a
    low-dimensional exploration head for a neural policy.

    Args:
        policy: ``build_policy("affine", ...)``, with or without ``min_t``, or ``MultiObjectiveGuidance([network,
            that affine policy])`` (see :func:`coefficient_parts`).
        std: the std of every coefficient (the initial std when ``learn_std``).
        learn_std: learn one log-std parameter.
        log_prob_reduction: reduce over the coefficients by ``"mean"`` (default) or ``"sum"`` (exact).
        return_log_prob, default_interaction_type, spec, observation_keys: as :func:`make_probabilistic_actor`.
    """
    check_reduction(log_prob_reduction)
    head = CoefficientHead(policy, std=std, learn_std=learn_std)
    dist_keys = {"loc": keys.LOC, "scale": keys.SCALE, "basis": keys.BASIS}
    if head.body is not None:
        dist_keys["offset"] = keys.OFFSET
    return _actor(
        TensorDictModule(head, in_keys=list(observation_keys), out_keys=list(dist_keys.values())),
        dist_keys,
        SubspaceNormal,
        {"reduction": log_prob_reduction},
        return_log_prob,
        default_interaction_type,
        spec,
    )
