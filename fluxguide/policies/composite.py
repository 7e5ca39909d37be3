"""Guidance composed of several models: per step range, per timestep range, and weighted objectives.

The seed's "step-specific" guidance (different models for different parts of the trajectory: layout early,
detail late) and ``MultiObjectiveGuidance`` (several objectives, one correction). Every composite declares its
structure (:class:`CompositeGuidance`: its parts, where and how much each acts, and how they combine); that one
declaration runs its ``forward``, writes its config, answers whether it reads the prompt, and is what code that
looks inside a policy reads (PPO's coefficient exploration, :func:`fluxguide.policies.actors.coefficient_parts`).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from typing_extensions import Unpack

from fluxguide.policies.base import BaseGuidanceModel, GuidanceArgs, as_batch_vector

Combine = Literal["sum", "first", "coarse"]


@dataclass(frozen=True)
class GuidancePart:
    """One guidance model inside a composite: how much, and where, it acts.

    Attributes:
        model: the part.
        weight: its correction's weight.
        times: acts at times ``t_lo <= t <= t_hi`` only (``None``: every time).
        steps: acts at steps ``start <= step < end`` only (``None``: every step).
    """

    model: nn.Module
    weight: float = 1.0
    times: tuple[float, float] | None = None
    steps: tuple[int, int] | None = None

    @property
    def everywhere(self) -> bool:
        """Whether the part acts at every time and step."""
        return self.times is None and self.steps is None

    def acts(self, t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Where the part acts: a ``(B,)`` bool mask for times ``t`` and step indices ``steps`` ``(B,)``."""
        mask = None
        if self.times is not None:
            mask = (t >= self.times[0]) & (t <= self.times[1])
        if self.steps is not None:
            in_steps = (steps >= self.steps[0]) & (steps < self.steps[1])
            mask = in_steps if mask is None else mask & in_steps
        return torch.ones(t.shape, dtype=torch.bool, device=t.device) if mask is None else mask


def guidance_parts(model: nn.Module) -> list[GuidancePart]:
    """The parts ``model`` declares (:meth:`CompositeGuidance.parts`); none for a network of its own."""
    return model.parts() if isinstance(model, CompositeGuidance) else []


def _routed(
    parts: Sequence[GuidancePart],
    latents_and_text: tuple[torch.Tensor, ...],
    t: torch.Tensor,
    step_idx: int | torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """Run each part on the samples where it acts (the first that acts wins), zero elsewhere; the observation is
    ``(img, pred, txt, vec)``, the times ``t`` ``(B,)``, the step index as given and ``steps`` ``(B,)``."""
    pred = latents_and_text[1]
    out = torch.zeros_like(pred)
    taken: torch.Tensor | None = None
    for part in parts:
        mask = part.acts(t, steps)
        mask = mask if taken is None else mask & ~taken
        if bool(mask.all()):
            # The common case (all samples at the same step): call the model on the whole batch, untouched.
            return part.model(*latents_and_text, t, step_idx).to(pred.dtype)
        idx = mask.nonzero().squeeze(1)
        if idx.numel():
            sub_steps = step_idx[idx] if isinstance(step_idx, torch.Tensor) and step_idx.numel() > 1 else step_idx
            piece = part.model(*(x[idx] for x in latents_and_text), t[idx], sub_steps)
            out = out.index_copy(0, idx, piece.to(pred.dtype))
        taken = mask if taken is None else taken | mask
    return out


class CompositeGuidance(BaseGuidanceModel):
    """A guidance model made of guidance models, declaring its structure.

    A subclass says how its parts combine (:attr:`combine`), lists them (:meth:`parts`) and writes its config
    around theirs (:meth:`config_entries`, :meth:`constructor_arguments`); the forward pass, the config's
    ``"type"``, and :attr:`text_aware` follow from that.

    Attributes:
        combine: ``"sum"``: the weighted sum of the parts' corrections (parts that act everywhere);
            ``"first"``: each sample gets the correction of the first part that acts at its time and step, zero
            where none does; ``"coarse"``: the one part's correction projected onto coarse corrections
            (:meth:`project`).
    """

    combine: ClassVar[Combine]

    @abstractmethod
    def parts(self) -> list[GuidancePart]:
        """The parts, in order."""

    @abstractmethod
    def config_entries(self, child: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
        """The config's entries but ``"type"``, with ``child(part)`` for a part's config."""

    def project(self, correction: torch.Tensor) -> torch.Tensor:
        """What ``combine = "coarse"`` makes of its one part's correction (the subclass's projection)."""
        raise NotImplementedError(f"{type(self).__name__} combines its part by projection: define project()")

    @property
    def text_aware(self) -> bool:  # type: ignore[override]
        """Whether any part reads the prompt."""
        return any(getattr(part.model, "text_aware", True) for part in self.parts())

    @property
    def config(self) -> dict[str, Any]:
        owner = type(self).__name__

        def child(model: nn.Module) -> dict[str, Any]:
            if not isinstance(model, BaseGuidanceModel):
                raise TypeError(f"{owner}.config needs every part to be a BaseGuidanceModel (with a config), got "
                                f"{type(model).__name__}")
            return model.config

        return {"type": owner, **self.config_entries(child)}

    def respond(self, *obs: Unpack[GuidanceArgs]) -> torch.Tensor:
        """The parts' corrections for the guidance call ``obs``, combined as :attr:`combine` says."""
        img, pred, txt, vec, timestep, step_idx = obs
        owner = type(self).__name__
        if img.ndim != 3 or pred.shape != img.shape:
            raise ValueError(
                f"{owner}: img and pred must both be packed latents (B, seq, C) of the same shape, got "
                f"{tuple(img.shape)} and {tuple(pred.shape)}"
            )
        if self.combine == "coarse":
            (part,) = self.parts()
            return self.project(part.model(*obs))
        if self.combine == "sum":
            total = torch.zeros_like(pred)
            for part in self.parts():
                total = total + part.weight * part.model(*obs).to(pred.dtype)
            return total
        b = img.shape[0]
        t = as_batch_vector(timestep, b, "timestep", owner, img.device)
        steps = as_batch_vector(step_idx, b, "step_idx", owner, img.device)
        per_sample = isinstance(step_idx, torch.Tensor) and step_idx.numel() > 1
        return _routed(self.parts(), (img, pred, txt, vec), t, steps if per_sample else step_idx, steps)


class _RangedGuidance(CompositeGuidance):
    """A model per range (of steps or times), saved as ``{"models": [{range_key: [lo, hi], "model": ...}]}``."""

    combine = "first"
    range_key: ClassVar[str]
    ranges: list[tuple[Any, Any]]
    models: nn.ModuleList

    def parts(self) -> list[GuidancePart]:
        return [GuidancePart(model, **{self.range_key: r}) for r, model in zip(self.ranges, self.models)]

    def config_entries(self, child: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
        return {"models": [{self.range_key: list(r), "model": child(m)} for r, m in zip(self.ranges, self.models)]}

    @classmethod
    def constructor_arguments(
        cls, config: dict[str, Any], build: Callable[[dict[str, Any]], BaseGuidanceModel]
    ) -> dict[str, Any]:
        return {"models": [(tuple(e[cls.range_key]), build(e["model"])) for e in config["models"]]}


class StepSpecificGuidance(_RangedGuidance):
    """A separate guidance model per range of step indices; steps outside every range get zero correction.

    Args:
        models: ``{(start_step, end_step): model}`` (or ``[((start_step, end_step), model), ...]``); a range covers
            ``start_step <= step < end_step`` (as ``range(start, end)``). Ranges must not overlap.

    Example:
        >>> guidance = StepSpecificGuidance({(0, 10): layout_model, (10, 28): detail_model})
    """

    range_key = "steps"

    def __init__(
        self, models: Mapping[tuple[int, int], nn.Module] | Sequence[tuple[tuple[int, int], nn.Module]]
    ) -> None:
        super().__init__()
        models = dict(models)
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

    def model_for_step(self, step_idx: int) -> nn.Module | None:
        """The model covering step ``step_idx``, or ``None``."""
        for (a, b), model in zip(self.ranges, self.models):
            if a <= step_idx < b:
                return model
        return None


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


class MultiObjectiveGuidance(CompositeGuidance):
    """Weighted sum of several guidance models' corrections (one model per objective).

    Args:
        models: the guidance models.
        weights: one weight per model (default: all 1).
    """

    combine = "sum"

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

    def parts(self) -> list[GuidancePart]:
        return [GuidancePart(model, weight) for model, weight in zip(self.models, self.weights)]

    def config_entries(self, child: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
        return {"models": [child(m) for m in self.models], "weights": list(self.weights)}

    @classmethod
    def constructor_arguments(
        cls, config: dict[str, Any], build: Callable[[dict[str, Any]], BaseGuidanceModel]
    ) -> dict[str, Any]:
        return {"models": [build(c) for c in config["models"]], "weights": config.get("weights")}
