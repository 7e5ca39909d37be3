"""Guidance composed of several models: per step range, per timestep range, and weighted objectives.

The seed's "step-specific" guidance (different models for different parts of the trajectory: layout early,
detail late) and ``MultiObjectiveGuidance`` (several objectives, one correction).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fluxguide.policies.base import BaseGuidanceModel, as_batch_vector, build_guidance_model

GuidanceCall = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor
]


def _check_latents(owner: str, img: torch.Tensor, pred: torch.Tensor) -> None:
    if img.ndim != 3 or pred.shape != img.shape:
        raise ValueError(
            f"{owner}: img and pred must both be packed latents (B, seq, C) of the same shape, got "
            f"{tuple(img.shape)} and {tuple(pred.shape)}"
        )


def _child_config(owner: str, model: nn.Module) -> dict[str, Any]:
    if not isinstance(model, BaseGuidanceModel):
        raise TypeError(
            f"{owner}.config needs every part to be a BaseGuidanceModel (with a config), "
            f"got {type(model).__name__}"
        )
    return model.config


def _routed(
    models: Sequence[nn.Module],
    masks: Sequence[torch.Tensor],
    img: torch.Tensor,
    pred: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    timestep: torch.Tensor,
    step_idx: int | torch.Tensor,
) -> torch.Tensor:
    """Run ``models[i]`` on the samples where ``masks[i]`` holds (first match wins); zero elsewhere."""
    out = torch.zeros_like(pred)
    if not masks:
        return out
    taken = torch.zeros_like(masks[0])
    for model, mask in zip(models, masks):
        mask = mask & ~taken
        if bool(mask.all()):
            # The common case (all samples at the same step): call the model on the whole batch, untouched.
            return model(img, pred, txt, vec, timestep, step_idx).to(pred.dtype)
        idx = mask.nonzero().squeeze(1)
        if idx.numel():
            steps = step_idx[idx] if isinstance(step_idx, torch.Tensor) and step_idx.numel() > 1 else step_idx
            part = model(img[idx], pred[idx], txt[idx], vec[idx], timestep[idx], steps)
            out = out.index_copy(0, idx, part.to(pred.dtype))
        taken = taken | mask
    return out


class _RangedGuidance(BaseGuidanceModel):
    """A model per range (of steps or times), saved as ``{"models": [{range_key: [lo, hi], "model": ...}]}``."""

    range_key: ClassVar[str]
    ranges: list[tuple[Any, Any]]
    models: nn.ModuleList

    @property
    def config(self) -> dict[str, Any]:
        owner = type(self).__name__
        return {
            "type": owner,
            "models": [{self.range_key: list(r), "model": _child_config(owner, m)} for r, m in zip(self.ranges, self.models)],
        }

    @classmethod
    def _from_entries(cls, entries: list[tuple[tuple[Any, Any], nn.Module]]) -> _RangedGuidance:
        raise NotImplementedError

    @classmethod
    def from_config(
        cls, config: dict[str, Any], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> _RangedGuidance:
        return cls._from_entries(
            [(tuple(e[cls.range_key]), build_guidance_model(e["model"], device, dtype)) for e in config["models"]]
        )


class StepSpecificGuidance(_RangedGuidance):
    """A separate guidance model per range of step indices; steps outside every range get zero correction.

    Args:
        models: ``{(start_step, end_step): model}``; a range covers ``start_step <= step < end_step``
            (as ``range(start, end)``). Ranges must not overlap.

    Example:
        >>> guidance = StepSpecificGuidance({(0, 10): layout_model, (10, 28): detail_model})
    """

    range_key = "steps"

    def __init__(self, models: Mapping[tuple[int, int], nn.Module]) -> None:
        super().__init__()
        ranges = [(int(a), int(b)) for a, b in models]
        for a, b in ranges:
            if not 0 <= a < b:
                raise ValueError(f"StepSpecificGuidance: step range ({a}, {b}) must satisfy 0 <= start < end")
        ordered = sorted(ranges)
        for (a0, b0), (a1, b1) in itertools.pairwise(ordered):
            if a1 < b0:
                raise ValueError(f"StepSpecificGuidance: step ranges ({a0}, {b0}) and ({a1}, {b1}) overlap")
        self.ranges = ranges
        self.models = nn.ModuleList(models.values())

    @classmethod
    def _from_entries(cls, entries: list[tuple[tuple[Any, Any], nn.Module]]) -> StepSpecificGuidance:
        return cls(dict(entries))

    def model_for_step(self, step_idx: int) -> nn.Module | None:
        """The model covering step ``step_idx``, or ``None``."""
        for (a, b), model in zip(self.ranges, self.models):
            if a <= step_idx < b:
                return model
        return None

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        _check_latents(type(self).__name__, img, pred)
        if not isinstance(step_idx, torch.Tensor) or step_idx.numel() == 1:
            model = self.model_for_step(int(step_idx))
            if model is None:
                return torch.zeros_like(pred)
            return model(img, pred, txt, vec, timestep, step_idx).to(pred.dtype)
        b = img.shape[0]
        steps = as_batch_vector(step_idx, b, "step_idx", type(self).__name__, img.device)
        timestep = as_batch_vector(timestep, b, "timestep", type(self).__name__, img.device)
        masks = [(steps >= a) & (steps < e) for a, e in self.ranges]
        return _routed(list(self.models), masks, img, pred, txt, vec, timestep, steps)


class TimestepRangeGuidance(_RangedGuidance):
    """A separate guidance model per range of times ``t`` in [0, 1] (1 = noise); zero outside every range.

    Args:
        models: ``[((t_lo, t_hi), model), ...]``; a range covers ``t_lo <= t <= t_hi``. Where ranges share
            a boundary the first listed model wins, so ``[((0.5, 1.0), early), ((0.0, 0.5), late)]``
            gives ``t = 0.5`` to ``early``.
    """

    range_key = "times"

    def __init__(self, models: Sequence[tuple[tuple[float, float], nn.Module]]) -> None:
        super().__init__()
        ranges = []
        for entry in models:
            (lo, hi), _ = entry
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(
                    f"TimestepRangeGuidance: time range ({lo}, {hi}) must satisfy 0 <= t_lo <= t_hi <= 1"
                )
            ranges.append((float(lo), float(hi)))
        self.ranges = ranges
        self.models = nn.ModuleList(m for _, m in models)

    @classmethod
    def _from_entries(cls, entries: list[tuple[tuple[Any, Any], nn.Module]]) -> TimestepRangeGuidance:
        return cls(entries)

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        _check_latents(type(self).__name__, img, pred)
        t = as_batch_vector(timestep, img.shape[0], "timestep", type(self).__name__, img.device)
        masks = [(t >= lo) & (t <= hi) for lo, hi in self.ranges]
        return _routed(list(self.models), masks, img, pred, txt, vec, t, step_idx)


class MultiObjectiveGuidance(BaseGuidanceModel):
    """Weighted sum of several guidance models' corrections (one model per objective).

    Args:
        models: the guidance models.
        weights: one weight per model (default: all 1).
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("MultiObjectiveGuidance needs at least one model")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models):
            raise ValueError(
                f"MultiObjectiveGuidance: {len(models)} models but {len(weights)} weights; give one per model"
            )
        self.models = nn.ModuleList(models)
        self.weights = weights

    @property
    def config(self) -> dict[str, Any]:
        owner = type(self).__name__
        return {
            "type": owner,
            "models": [_child_config(owner, m) for m in self.models],
            "weights": list(self.weights),
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MultiObjectiveGuidance:
        return cls([build_guidance_model(c, device, dtype) for c in config["models"]], config.get("weights"))

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        _check_latents(type(self).__name__, img, pred)
        total = torch.zeros_like(pred)
        for weight, model in zip(self.weights, self.models):
            total = total + weight * model(img, pred, txt, vec, timestep, step_idx).to(pred.dtype)
        return total
