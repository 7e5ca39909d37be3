"""The shapes world: an embedded procedural world with the structure of Flux, small enough for two CPU cores."""

from fluxguide.worlds.shapes.clip import SHAPES_CLIP_NAME, create_shapes_clip, register_shapes_clip
from fluxguide.worlds.shapes.scenes import (
    all_prompts,
    heldout_prompts,
    parse_prompt,
    render,
    train_prompts,
)
from fluxguide.worlds.shapes.verifier import VerificationResult, verify
from fluxguide.worlds.shapes.world import ShapesWorld

register_shapes_clip()

__all__ = [
    "SHAPES_CLIP_NAME",
    "ShapesWorld",
    "VerificationResult",
    "all_prompts",
    "create_shapes_clip",
    "heldout_prompts",
    "parse_prompt",
    "register_shapes_clip",
    "render",
    "train_prompts",
    "verify",
]
