"""The core an env face runs on: given, or built over a backbone (the pretrained shapes world by default)."""

from __future__ import annotations

from typing import Any

import torch

from fluxguide.backbones.base import Backbone
from fluxguide.envs.core import GuidanceCore


def make_core(
    backbone: Backbone | None = None,
    *,
    core: GuidanceCore | None = None,
    device: torch.device | str | None = None,
    **core_kwargs: Any,
) -> GuidanceCore:
    """The core an env face runs on: ``core`` as given, or a new one over ``backbone``.

    Args:
        backbone: the base model; ``None`` loads the pretrained shapes world
            (``build_backbone("shapes")``) on ``device``.
        core: an existing core (then nothing else may be passed).
        device: where to load the default shapes world; a given backbone stays where it is.
        **core_kwargs: :class:`GuidanceCore` arguments.
    """
    if core is not None:
        if backbone is not None or core_kwargs or device is not None:
            extra = sorted(core_kwargs) + (["backbone"] if backbone is not None else []) + (["device"] if device else [])
            raise ValueError(f"pass either core= or the core's arguments, not both (got core= and {extra})")
        return core
    if backbone is None:
        from fluxguide.backbones.registry import build_backbone

        backbone = build_backbone("shapes", device=device or "cpu")
    elif device is not None and not _same_device(torch.device(device), backbone.device):
        raise ValueError(
            f"device={device!r} but the backbone is on {backbone.device}: move the backbone with "
            f"backbone.to(device) (the env runs where its backbone is)"
        )
    return GuidanceCore(backbone, **core_kwargs)


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    return wanted.type == actual.type and (wanted.index is None or wanted.index == actual.index)
