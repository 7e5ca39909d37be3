"""A Gaussian over whole corrections whose log-probability is one number per sample.

TorchRL's PPO takes ``exp(log_prob - old_log_prob)`` per sample, so the policy's log-prob must be reduced
over the action dimensions ``(seq, C)``. The sum is the exact log-density; the mean (the sum divided by
``seq * C``) keeps importance ratios in a sane range when the action has thousands of dimensions
(Flow-GRPO and DDPO implementations average over latent dimensions for the same reason).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch.distributions import Distribution, Normal, constraints, register_kl
from torch.distributions.utils import broadcast_all

from fluxguide.sampling.steps import gaussian_log_prob

Reduction = Literal["mean", "sum"]


class ReducedNormal(Normal):
    """Element-wise ``N(loc, scale^2)`` over actions ``(*batch, seq, C)`` with log-prob reduced per sample.

    The last ``event_dims`` dimensions are the event: ``batch_shape = loc.shape[:-event_dims]``,
    ``log_prob`` and ``entropy`` return ``batch_shape``. Log-probs are computed in float32 (DESIGN.md
    precision rule) whatever the dtype of ``loc``.

    Args:
        loc: mean (the guidance network's output).
        scale: std, broadcastable to ``loc`` (e.g. ``(*batch, 1, 1)``).
        reduction: ``"sum"`` (the exact joint log-density) or ``"mean"`` (the sum over ``seq * C``).
        event_dims: number of trailing dimensions forming one action.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor | float,
        reduction: Reduction = "mean",
        event_dims: int = 2,
        validate_args: bool | None = None,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
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
        """Unreduced float32 log-density, shaped like the action."""
        if self._validate_args:
            self._validate_sample(value)
        return gaussian_log_prob(value, self.loc, self.scale)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._reduce(self.elementwise_log_prob(value))

    def entropy(self) -> torch.Tensor:
        return self._reduce(super().entropy().float())

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
    p_loc, p_scale, q_loc, q_scale = (x.float() for x in (p.loc, p.scale, q.loc, q.scale))
    var_ratio = (p_scale / q_scale) ** 2
    kl = 0.5 * (var_ratio + ((p_loc - q_loc) / q_scale) ** 2 - 1 - torch.log(var_ratio))
    return p._reduce(kl)
