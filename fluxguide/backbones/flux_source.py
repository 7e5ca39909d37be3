"""Where a Flux pipeline comes from: a local diffusers FluxPipeline folder (checked before anything loads) or a
hub id, and the scheduler configuration that defines its sampling schedule."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from fluxguide.backbones.weights import WeightsNotFoundError

#: The subfolders of a diffusers FluxPipeline folder that :meth:`FluxBackbone.from_pretrained` needs
#: (``scheduler/`` is optional: without it Flux-dev's schedule is used).
REQUIRED_SUBFOLDERS: tuple[str, ...] = (
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "vae",
)


def _is_local_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a local folder rather than a hub id (``owner/name``)."""
    text = os.fspath(path)
    if isinstance(path, Path) or Path(text).exists() or os.path.isabs(text):
        return True
    return text.startswith((".", "~")) or text.count("/") != 1 or "\\" in text


def resolve_pipeline_source(
    path_or_hub_id: str | os.PathLike[str], common: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any] | None]:
    """The source string the components load from and the scheduler config (``None``: Flux-dev's schedule).

    Raises:
        WeightsNotFoundError: (a ``FileNotFoundError``) a local folder that does not exist or lacks one of :data:`REQUIRED_SUBFOLDERS`.
    """
    source = os.fspath(path_or_hub_id)
    scheduler_config: Mapping[str, Any] | None = None
    if _is_local_path(path_or_hub_id):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(
                f"Flux folder {str(folder)!r} does not exist; pass a diffusers FluxPipeline folder "
                "(FluxPipeline.save_pretrained) or a hub id such as 'black-forest-labs/FLUX.1-dev'"
            )
        missing = [name for name in REQUIRED_SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise WeightsNotFoundError(
                f"Flux folder {str(folder)!r} is missing the subfolder(s) {', '.join(missing)}; a "
                f"diffusers FluxPipeline folder holds {', '.join(REQUIRED_SUBFOLDERS)} and scheduler "
                "(write one with FluxPipeline.save_pretrained(folder))"
            )
        source = str(folder)
        if (folder / "scheduler").is_dir():
            scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler")
    else:
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            source, subfolder="scheduler", **common
        )
    return source, scheduler_config
