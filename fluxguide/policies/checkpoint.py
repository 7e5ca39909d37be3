"""Guidance-model files: weights in safetensors with the model's config in the file's metadata.

One file rebuilds the model (no pickle, docs/design.md): ``load_guidance_model(path)`` reads the config,
builds the architecture with :func:`build_guidance_model` and loads the weights. The config's tensor shapes
are compared with the file's header (a build on the ``meta`` device, no memory) before the network is
allocated, so a config that asks for a huge network is refused, not allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from fluxguide.errors import UserError
from fluxguide.policies.base import BaseGuidanceModel, build_guidance_model
from fluxguide.serialization import atomic_output

CONFIG_METADATA_KEY = "fluxguide_guidance_config"

Shapes = dict[str, tuple[int, ...]]


class GuidanceFileError(UserError, ValueError):
    """A guidance model file that cannot be loaded: unreadable, without a config, or whose config and weights
    disagree; the message names the file and the fix."""


def save_guidance_model(model: BaseGuidanceModel, path: str | Path) -> Path:
    """Write ``model``'s weights and config to a ``.safetensors`` file (atomically, never through a link);
    returns the path."""
    if not isinstance(model, BaseGuidanceModel):
        raise TypeError(
            f"save_guidance_model needs a BaseGuidanceModel (with a config), got {type(model).__name__}"
        )
    path = Path(path)
    with atomic_output(path) as tmp:
        save_model(model, tmp, metadata={CONFIG_METADATA_KEY: json.dumps(model.config)})
    return path


def _open_error(path: str | Path, e: Exception) -> GuidanceFileError:
    return GuidanceFileError(
        f"guidance model file {str(path)!r} is not a readable safetensors file ({e}): it is truncated or was not "
        "written by save_guidance_model; use an intact copy (a run folder's guidance.safetensors or a checkpoint)"
    )


def read_guidance_config(path: str | Path) -> dict:
    """The config stored in a file written by :func:`save_guidance_model`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"guidance model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _open_error(path, e) from e
    if CONFIG_METADATA_KEY not in metadata:
        raise GuidanceFileError(
            f"{path} holds no guidance config (metadata key {CONFIG_METADATA_KEY!r}); it was not written by "
            "save_guidance_model. Build the model yourself and load the weights with "
            "safetensors.torch.load_model"
        )
    return json.loads(metadata[CONFIG_METADATA_KEY])


def load_guidance_model(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> BaseGuidanceModel:
    """Rebuild the model saved by :func:`save_guidance_model` and load its weights (strictly).

    Raises:
        GuidanceFileError: the file is unreadable or holds no config, or the config builds tensors of other names
            or shapes than the file holds (found from the header and a ``meta`` build, before allocating).
    """
    config = read_guidance_config(path)
    stored = stored_shapes(path)
    expected = config_shapes(config)
    if expected is not None and expected != stored:
        raise _mismatch_error(path, stored, expected, config)
    model = build_guidance_model(config, device=device, dtype=dtype)
    try:
        load_model(model, str(path), strict=True, device=str(device) if device is not None else "cpu")
    except RuntimeError as e:
        raise _mismatch_error(path, stored, {k: tuple(v.shape) for k, v in model.state_dict().items()}, config) from e
    return model


def stored_shapes(path: str | Path) -> Shapes:
    """Every tensor's shape in a safetensors file, read from its header (no tensor is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError) as e:
        raise _open_error(path, e) from e


def config_shapes(config: dict) -> Shapes | None:
    """The shapes of the tensors the model of ``config`` holds, from a build on the ``meta`` device (no memory);
    ``None`` for an architecture that cannot be built there (its ``__init__`` reads tensor values), which is
    then compared after the real build."""
    try:
        with torch.device("meta"):
            model = build_guidance_model(config)
    except (NotImplementedError, RuntimeError):
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch_error(path: str | Path, stored: Shapes, expected: Shapes, config: dict) -> GuidanceFileError:
    """The config stored in ``path`` builds a model whose tensors differ from the file's: name the file, the first
    differing tensor with both shapes, and a few more differences."""
    lines = [f"{k}: file {stored[k]} vs config {expected[k]}" for k in expected if k in stored and stored[k] != expected[k]]
    lines += [f"{k}: missing from the file (config {expected[k]})" for k in expected if k not in stored]
    lines += [f"{k}: in the file {stored[k]} but not in the config's model" for k in stored if k not in expected]
    first, _, rest = lines[0].partition(": ") if lines else ("?", "", "")
    shown = "; ".join(lines[1:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
    name = config.get("type", "?") if isinstance(config, dict) else "?"
    return GuidanceFileError(
        f"guidance model file {str(path)!r}: its stored config (architecture {name!r}) and its weights disagree "
        f"({len(lines)} tensors differ): first differing tensor {first!r}: {rest}"
        + (f"; also {shown}" if shown else "") + ". The file's metadata was written for another model; save it "
        "again with save_guidance_model(model, path) from the model that owns these weights"
    )
