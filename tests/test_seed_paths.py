"""Every name the seed documents imports from its fluxguide path (``flux.X`` -> ``fluxguide.X``)."""

from __future__ import annotations

import importlib

import pytest

SEED_NAMES = {
    "fluxguide.sampling": ["denoise", "get_schedule"],
    "fluxguide.guidance_models": [
        "BaseGuidanceModel", "MLPGuidanceModel", "AttentionGuidanceModel", "ConvGuidanceModel",
        "GuidanceModelTrainer", "create_mlp_guidance_model", "MultiObjectiveGuidance",
    ],
    "fluxguide.sampling_instrumented": [
        "denoise_with_state_collection", "StateCollectionCallback", "create_training_pairs",
    ],
    "fluxguide.data.targets": ["GuidanceDataCollector"],
}


@pytest.mark.parametrize(("module", "names"), SEED_NAMES.items())
def test_seed_names_import(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"
