"""Checks of what goes into and comes out of a reward (the contract in docs/design.md, "rewards").

Rewards see images ``(B, 3, H, W)`` as floats in [0, 1] and one prompt per image, and return ``(B,)``
finite floats. Every check raises an error that names the bad value and says how to fix it, rather than
silently clamping or broadcasting (a reward that quietly accepts images in [-1, 1] scores the wrong thing,
and an inf reward under a reward target's clamp trains on nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fluxguide.errors import UserError


class RewardOutputError(UserError, ValueError):
    """A reward returned something other than one finite float per image; the message names the reward."""


class RewardOutputTypeError(RewardOutputError, TypeError):
    """A reward returned something other than a floating-point tensor (a ``TypeError`` too, as it was)."""


class NonFiniteRewardError(RewardOutputError, FloatingPointError):
    """A reward returned NaN or inf. A ``FloatingPointError`` too, so a training loop stops the update as it
    does on a non-finite loss: nothing is stepped and no checkpoint is written for it."""

#: How far outside [0, 1] a pixel may be before it is an error: covers bf16/fp16 rounding of clamped
#: decoder output (bf16 spacing just below 1 is 2**-8), not images in [-1, 1] or [0, 255].
DEFAULT_RANGE_TOLERANCE = 1e-2


def check_images(images: object, *, tolerance: float = DEFAULT_RANGE_TOLERANCE, name: str = "images") -> None:
    """Check that ``images`` is a float tensor ``(B, 3, H, W)`` with values in [0, 1].

    Args:
        images: the tensor to check.
        tolerance: how far outside [0, 1] a value may be.
        name: what to call the tensor in error messages.

    Raises:
        TypeError: not a tensor, or not floating point.
        ValueError: wrong number of dimensions or channels, empty, non-finite, or values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}.")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor in [0, 1], got dtype {images.dtype}; "
            f"for 8-bit images pass images.float() / 255."
        )
    if images.ndim != 4:
        hint = " Add a batch dimension with images.unsqueeze(0)." if images.ndim == 3 else ""
        raise ValueError(
            f"{name} must have 4 dimensions (B, 3, H, W), got {images.ndim} with shape {tuple(images.shape)}.{hint}"
        )
    if images.shape[1] != 3:
        hint = (
            " Channels-last input? Use images.permute(0, 3, 1, 2)."
            if images.shape[-1] == 3
            else " Convert to RGB (e.g. repeat a grey channel 3 times, drop an alpha channel)."
        )
        raise ValueError(
            f"{name} must have 3 (RGB) channels in dim 1, got {images.shape[1]} with shape "
            f"{tuple(images.shape)}.{hint}"
        )
    if images.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)}); pass at least one image.")
    with torch.no_grad():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = lo.item(), hi.item()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains non-finite values (min {lo}, max {hi}); check the decoder output.")
    if lo < -tolerance or hi > 1.0 + tolerance:
        hint = (
            " They look like [-1, 1] images: pass (images + 1) / 2."
            if lo >= -1.0 - tolerance and lo < -tolerance
            else " They look like [0, 255] images: pass images / 255."
            if hi > 1.5
            else " Clamp them with images.clamp(0, 1)."
        )
        raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}].{hint}")


def check_prompts(prompts: object, batch_size: int) -> None:
    """Check that ``prompts`` is a list (or tuple) of ``batch_size`` strings, one per image.

    Raises:
        TypeError: a single string, not a sequence, or non-string items.
        ValueError: the wrong number of prompts.
    """
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts must be a list of strings, one per image, got a single string {prompts!r}; "
            f"pass [{prompts!r}] * {batch_size}."
        )
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, one per image, got {type(prompts).__name__}.")
    if len(prompts) != batch_size:
        raise ValueError(
            f"got {len(prompts)} prompts for {batch_size} images; pass exactly one prompt per image "
            f"(repeat each prompt for the images sampled from it)."
        )
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; items (index, type) {bad[:5]} are not.")


def check_reward_output(values: object, batch_size: int, *, source: str) -> torch.Tensor:
    """Check a reward's output is a finite floating-point ``(batch_size,)`` tensor and return it as float32.

    Args:
        values: what the reward returned.
        batch_size: the number of images it was given.
        source: the reward's name, for the error message.

    Raises:
        RewardOutputTypeError: not a tensor, or not floating point.
        RewardOutputError: not of shape ``(batch_size,)``.
        NonFiniteRewardError: NaN or inf values.
    """
    if not isinstance(values, torch.Tensor):
        raise RewardOutputTypeError(
            f"{source} must return a torch.Tensor of shape ({batch_size},), got {type(values).__name__}."
        )
    if not values.is_floating_point():
        raise RewardOutputTypeError(
            f"{source} must return floating-point values, got dtype {values.dtype}: a reward is a score, not a "
            f"count or a flag; return values.float()."
        )
    if values.shape != (batch_size,):
        hint = " Squeeze the last dimension (values.squeeze(-1))." if values.shape == (batch_size, 1) else ""
        raise RewardOutputError(
            f"{source} must return one value per image, shape ({batch_size},), got shape {tuple(values.shape)}.{hint}"
        )
    check_finite_rewards(values, source=source)
    # Rewards feed float32 sampler and loss math (docs/design.md, "Precision"), whatever the model's dtype.
    return values.float()


def check_finite_rewards(values: torch.Tensor, *, source: str) -> None:
    """Raise :class:`NonFiniteRewardError` naming ``source``, how many values are NaN / inf and the first
    images they belong to. Checked before any clamp or mean can hide them (a reward target clamps an inf)."""
    with torch.no_grad():
        finite = torch.isfinite(values.detach())
        if bool(finite.all()):
            return
        nan = int(torch.isnan(values.detach()).sum())
    inf = int((~finite).sum()) - nan
    counts = " and ".join(f"{n} {kind} value{'s' if n > 1 else ''}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    where = (~finite).nonzero().flatten()[:5].tolist()
    raise NonFiniteRewardError(
        f"{source} returned {counts} for {values.numel()} images (image{'s' if len(where) > 1 else ''} "
        f"{', '.join(map(str, where))}{', ...' if int((~finite).sum()) > len(where) else ''}): a reward must give "
        f"every image a finite score. Fix the reward (guard its divisions and logarithms; score a failure as a "
        f"low finite value)."
    )
