"""A base model's weights: the errors of weights that cannot be used and the check that finds non-finite ones."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import nn

from fluxguide.errors import UserError


class WeightsError(UserError, ValueError):
    """A base model's weights that cannot be used: corrupt, non-finite, or (:class:`WeightsNotFoundError`) missing."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A base model's weight file or folder that does not exist."""


def check_finite_weights(tensors: Mapping[str, torch.Tensor] | nn.Module, source: str, fix: str = "") -> None:
    """Raise if any floating-point weight holds NaN or inf, naming ``source`` (a file or component) and the
    first bad tensors. Run once when a base model is loaded, so broken weights are not later reported as a
    guidance-model or learning-rate problem. Tensors on the meta device (not yet loaded) are skipped."""
    items = (
        itertools.chain(tensors.named_parameters(), tensors.named_buffers())
        if isinstance(tensors, nn.Module) else tensors.items()
    )
    bad: list[str] = []
    with torch.no_grad():
        for name, t in items:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta":
                continue
            if not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                bad.append(f"{name} ({n} of {t.numel()} values)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise WeightsError(
            f"the base model's weights in {source} hold NaN/inf values: {', '.join(bad[:5])}{more}. The weights "
            f"are damaged (or were saved from a diverged run); {fix or 'load an intact copy of them'}"
        )
