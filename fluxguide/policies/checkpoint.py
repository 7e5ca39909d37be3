"""Guidance-model files: weights in safetensors with the model's config in the file's metadata.

One file rebuilds the model (no pickle, docs/design.md): ``load_guidance_model(path)`` reads the config,
builds the architecture with :func:`build_guidance_model` and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from fluxguide.policies.base import BaseGuidanceModel, build_guidance_model

CONFIG_METADATA_KEY = "fluxguide_guidance_config"


def save_guidance_model(model: BaseGuidanceModel, path: str | Path) -> Path:
    """Write ``model``'s weights and config to a ``.safetensors`` file; returns the path."""
    if not isinstance(model, BaseGuidanceModel):
        raise TypeError(
            f"save_guidance_model needs a BaseGuidanceModel (with a config), got {type(model).__name__}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(model.config)})
    return path


def read_guidance_config(path: str | Path) -> dict:
    """The config stored in a file written by :func:`save_guidance_model`."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if CONFIG_METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} holds no guidance config (metadata key {CONFIG_METADATA_KEY!r}); it was not written by "
            "save_guidance_model. Build the model yourself and load the weights with "
            "safetensors.torch.load_model"
        )
    return json.loads(metadata[CONFIG_METADATA_KEY])


def load_guidance_model(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> BaseGuidanceModel:
    """Rebuild the model saved by :func:`save_guidance_model` and load its weights (strictly)."""
    model = build_guidance_model(read_guidance_config(path), device=device, dtype=dtype)
    load_model(model, str(path), strict=True, device=str(device) if device is not None else "cpu")
    return model
