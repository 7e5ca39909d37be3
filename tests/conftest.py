"""Fixtures every test folder shares: the shapes worlds and the tiny random Flux pipeline folder.

One definition each, so that a test asking for ``shapes_random`` gets the same world wherever it lives. They are
module-scoped: a module that changes its world (a hook, a moved parameter) leaves the other modules' alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxguide.worlds.shapes.world import ShapesWorld, random_world


@pytest.fixture(scope="module")
def shapes_random() -> ShapesWorld:
    """The backbone ``"shapes-random"`` (seed 0): a randomly initialised shapes world (tiny CLIP + tiny Flux
    transformer), built without touching the global RNG. Enough for every mechanic; no trained weights needed."""
    return random_world(seed=0)


@pytest.fixture(scope="module")
def shapes_pretrained() -> ShapesWorld:
    """The backbone ``"shapes"``: the shapes world with its shipped trained weights."""
    return ShapesWorld.pretrained()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random diffusers ``FluxPipeline`` saved to a folder, as a user's local Flux checkpoint is."""
    from fluxguide.backbones.tiny_flux import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipeline")
