"""A Gaussian over whole corrections whose log-probability is one number per sample.

TorchRL's PPO takes ``exp(log_prob - old_log_prob)`` per sample, so the policy's log-prob must be reduced
over the action dimensions ``(seq, C)``. The sum is the exact log-density; the mean (the sum divided by
``seq * C``) keeps importance ratios in a sane range when the action has thousands of dimensions
(Flow-GRPO and DDPO implementations average over latent dimensions for the same reason).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch.distributions import Distribution, Normal, constraints, register_kl
from torch.distributions.utils import broadcast_all

from fluxguide.policies.coarse import coarse_coordinates, expand_coarse, project_coarse
from fluxguide.sampling.steps import gaussian_log_prob

Reduction = Literal["mean", "sum"]
_LOG_SQRT_2PI_E = 0.5 + 0.5 * math.log(2 * math.pi)
# A zero std is allowed: it marks a point mass (a step or coordinate the policy does not explore).
_LOC_SCALE_CONSTRAINTS: dict[str, constraints.Constraint] = {"loc": constraints.real, "scale": constraints.nonnegative}


def check_reduction(reduction: str) -> None:
    """Refuse a log-prob reduction other than ``"mean"`` and ``"sum"`` (the distributions' and the actors')."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got {reduction!r}")


def _masked_log_prob(diff: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log N(diff; 0, scale^2)`` in float32, and 0 where ``scale == 0`` (a point mass; no NaN in any gradient)."""
    active = scale > 0
    safe = torch.where(active, scale, torch.ones_like(scale))
    log_prob = gaussian_log_prob(diff, torch.zeros_like(diff), safe)
    return torch.where(active, log_prob, torch.zeros_like(log_prob))


def _masked_entropy(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.float()
    active = scale > 0
    entropy = _LOG_SQRT_2PI_E + torch.log(torch.where(active, scale, torch.ones_like(scale)))
    return torch.where(active, entropy, torch.zeros_like(entropy))


def _gaussian_kl(p_loc: torch.Tensor, p_scale: torch.Tensor, q_loc: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(N(p_loc, p_scale^2) || N(q_loc, q_scale^2))`` in float32; 0 where both stds are 0."""
    p_loc, p_scale, q_loc, q_scale = (x.float() for x in (p_loc, p_scale, q_loc, q_scale))
    both_point = (p_scale == 0) & (q_scale == 0)
    q_safe = torch.where(both_point, torch.ones_like(q_scale), q_scale)
    p_safe = torch.where(both_point, torch.ones_like(p_scale), p_scale)
    var_ratio = (p_safe / q_safe) ** 2
    kl = 0.5 * (var_ratio + ((p_loc - q_loc) / q_safe) ** 2 - 1 - torch.log(var_ratio))
    return torch.where(both_point, torch.zeros_like(kl), kl)


class ReducedNormal(Normal):
    """Element-wise ``N(loc, scale^2)`` over actions ``(*batch, seq, C)`` with log-prob reduced per sample.

    The last ``event_dims`` dimensions are the event: ``batch_shape = loc.shape[:-event_dims]``,
    ``log_prob`` and ``entropy`` return ``batch_shape``. Log-probs are computed in float32 (docs/design.md
    precision rule) whatever the dtype of ``loc``.

    Args:
        loc: mean (the guidance network's output).
        scale: std, broadcastable to ``loc`` (e.g. ``(*batch, 1, 1)``). A zero std marks a point mass at ``loc``
            (a step where the policy does not explore): its action is ``loc`` and it adds 0 to log-probs,
            entropies and KLs, so its importance ratio is exactly 1.
        reduction: ``"sum"`` (the exact joint log-density) or ``"mean"`` (the sum over ``seq * C``).
        event_dims: number of trailing dimensions forming one action.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = _LOC_SCALE_CONSTRAINTS

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor | float,
        reduction: Reduction = "mean",
        event_dims: int = 2,
        validate_args: bool | None = None,
    ) -> None:
        check_reduction(reduction)
        self.loc, self.scale = broadcast_all(loc, scale)
        if self.loc.ndim < event_dims:
            raise ValueError(
                f"loc of shape {tuple(self.loc.shape)} has fewer than event_dims={event_dims} dims"
            )
        self.reduction = reduction
        self.event_dims = event_dims
        shape = self.loc.shape
        Distribution.__init__(
            self,
            shape[: len(shape) - event_dims],
            shape[len(shape) - event_dims :],
            validate_args=validate_args,
        )

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.event_dims, 0))
        return x.sum(dims) if self.reduction == "sum" else x.mean(dims)

    def elementwise_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Unreduced float32 log-density, shaped like the action (0 where the std is 0)."""
        if self._validate_args:
            self._validate_sample(value)
        return _masked_log_prob(value - self.loc, self.scale)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._reduce(self.elementwise_log_prob(value))

    def entropy(self) -> torch.Tensor:
        return self._reduce(_masked_entropy(self.scale.expand_as(self.loc)))

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """What TorchRL's DETERMINISTIC interaction returns: the mean correction."""
        return self.loc

    def expand(self, batch_shape: torch.Size, _instance: ReducedNormal | None = None) -> ReducedNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        return ReducedNormal(
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.reduction,
            self.event_dims,
            validate_args=False,
        )


@register_kl(ReducedNormal, ReducedNormal)
def _kl_reduced_normal(p: ReducedNormal, q: ReducedNormal) -> torch.Tensor:
    """``KL(p || q)`` reduced like ``p`` (the per-step control cost when ``q`` is the base sampler's step)."""
    if p.reduction != q.reduction or p.event_dims != q.event_dims:
        raise ValueError(
            f"KL between ReducedNormals needs the same reduction and event_dims, got ({p.reduction}, "
            f"{p.event_dims}) and ({q.reduction}, {q.event_dims})"
        )
    return p._reduce(_gaussian_kl(p.loc, p.scale, q.loc, q.scale))


class CoarseNormal(ReducedNormal):
    """A :class:`ReducedNormal` whose noise, and mean, are coarse: constant over each token's packed pixels.

    ``action = P(loc) + scale * E(z)``, ``z ~ N(0, I)`` of shape ``(*batch, seq, channels)``, with ``P`` the
    projection onto coarse corrections and ``E`` the repeat over a channel's pixels
    (:mod:`fluxguide.policies.coarse`). Every pixel's noise has std ``scale`` (as in :class:`ReducedNormal`);
    the density is the exact Gaussian on the ``seq * channels`` coarse coordinates, and ``"mean"`` reduces over
    them. Actions that are not coarse have no density here: sample them from this distribution. ``scale``
    is one std per sample (or per coarse coordinate); its mean over a token's pixels is used.

    Args:
        loc, scale, reduction: as :class:`ReducedNormal`; the event is one packed latent ``(seq, C)``.
        channels: image (or latent) channels per token: 3 in the shapes world, 16 in Flux.
    """

    def __init__(
        self, loc: torch.Tensor, scale: torch.Tensor | float, reduction: Reduction = "mean", channels: int = 3,
        validate_args: bool | None = None,
    ) -> None:
        super().__init__(project_coarse(loc, channels), scale, reduction, 2, validate_args)
        self.channels = channels

    @property
    def coarse_scale(self) -> torch.Tensor:
        """The std of each coarse coordinate, ``(*batch, seq, channels)``."""
        return coarse_coordinates(self.scale, self.channels)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        z = torch.randn((*shape[:-1], self.channels), dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + expand_coarse(self.coarse_scale * z, shape[-1])

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def elementwise_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Float32 log-density of each coarse coordinate, ``(*batch, seq, channels)``."""
        if self._validate_args:
            self._validate_sample(value)
        return _masked_log_prob(coarse_coordinates(value - self.loc, self.channels), self.coarse_scale)

    def entropy(self) -> torch.Tensor:
        return self._reduce(_masked_entropy(self.coarse_scale))

    def expand(self, batch_shape: torch.Size, _instance: CoarseNormal | None = None) -> CoarseNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        return CoarseNormal(self.loc.expand(shape), self.scale.expand(shape), self.reduction, self.channels,
                            validate_args=False)


@register_kl(CoarseNormal, CoarseNormal)
def _kl_coarse_normal(p: CoarseNormal, q: CoarseNormal) -> torch.Tensor:
    """``KL(p || q)`` on the coarse coordinates, reduced like ``p``."""
    if (p.reduction, p.event_dims, p.channels) != (q.reduction, q.event_dims, q.channels):
        raise ValueError(
            f"KL between CoarseNormals needs the same reduction and channels, got ({p.reduction}, {p.channels}) "
            f"and ({q.reduction}, {q.channels})"
        )
    p_loc, q_loc = (coarse_coordinates(x, p.channels) for x in (p.loc, q.loc))
    return p._reduce(_gaussian_kl(p_loc, p.coarse_scale, q_loc, q.coarse_scale))


class SubspaceNormal(Distribution):
    """A Gaussian over the coefficients of an action in a per-observation basis: ``action = offset + sum_k c_k
    basis_k``, ``c ~ N(loc, scale^2 I)``.

    The exploration of a policy with few outputs (:class:`fluxguide.policies.AffineGuidance`: ``2 * channels``
    coefficients of ``img`` and ``pred``) then lives in those few dimensions, and the policy gradient's noise
    with it. The density is the exact Gaussian of the coefficients, which are recovered from an action by least
    squares in the basis (which depends only on the observation, so old and new policies share it).

    Args:
        loc: coefficient means ``(*batch, K)``.
        scale: std ``(*batch, 1)`` or ``(*batch, K)``; 0 is a point mass (log-prob 0, see :class:`ReducedNormal`).
        basis: ``(*batch, K, seq, C)``.
        reduction: reduce the ``K`` coefficient log-densities by ``"mean"`` or ``"sum"``.
        offset: ``(*batch, seq, C)``, a deterministic part of the action outside the explored coefficients (a
            neural policy's correction under an explored affine head); default 0.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = _LOC_SCALE_CONSTRAINTS

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        basis: torch.Tensor,
        reduction: Reduction = "mean",
        validate_args: bool | None = None,
        offset: torch.Tensor | None = None,
    ) -> None:
        check_reduction(reduction)
        if basis.shape[:-2] != loc.shape:
            raise ValueError(
                f"basis {tuple(basis.shape)} must be (*batch, K, seq, C) for coefficients loc {tuple(loc.shape)}"
            )
        if offset is not None and offset.shape != basis.shape[:-3] + basis.shape[-2:]:
            raise ValueError(f"offset {tuple(offset.shape)} must be (*batch, seq, C) = "
                             f"{tuple(basis.shape[:-3] + basis.shape[-2:])} for basis {tuple(basis.shape)}")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.basis, self.reduction, self.offset = basis, reduction, offset
        Distribution.__init__(self, loc.shape[:-1], basis.shape[-2:], validate_args=validate_args)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1) if self.reduction == "sum" else x.mean(-1)

    def _combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        action = torch.einsum("...k,...ksc->...sc", coefficients.to(self.basis.dtype), self.basis)
        return action if self.offset is None else action + self.offset.to(action.dtype)

    def coordinates(self, value: torch.Tensor) -> torch.Tensor:
        """The basis coefficients ``(*batch, K)`` of actions ``(*batch, seq, C)`` less the offset (least squares,
        float32)."""
        if self.offset is not None:
            value = value - self.offset
        basis = self.basis.float().flatten(-2)
        gram = basis @ basis.transpose(-1, -2)
        # A small ridge keeps a degenerate basis (an all-zero channel) solvable; it changes nothing measurable.
        ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-12)
        gram = gram + torch.diag_embed(ridge.expand(*gram.shape[:-1]))
        rhs = (basis @ value.float().flatten(-2).unsqueeze(-1))
        return torch.linalg.solve(gram, rhs).squeeze(-1)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.loc.shape
        coefficients = self.loc + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self._combine(coefficients)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._reduce(_masked_log_prob(self.coordinates(value) - self.loc.float(), self.scale))

    def entropy(self) -> torch.Tensor:
        return self._reduce(_masked_entropy(self.scale))

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """The mean action: the offset plus the mean coefficients' combination of the basis."""
        return self._combine(self.loc)

    @property
    def mean(self) -> torch.Tensor:
        return self.deterministic_sample
