"""Every name the seed documents has one canonical home and imports, as the same object, from ``fluxguide``,
from that home and from the seed's own module path (``flux.X`` -> ``fluxguide.X``); ``import fluxguide`` is lazy."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import fluxguide

#: seed name -> its canonical home (a fluxguide folder's public namespace).
CANONICAL = {
    "denoise": "fluxguide.sampling",
    "get_schedule": "fluxguide.sampling",
    "apply_guidance_model": "fluxguide.sampling",
    "denoise_with_state_collection": "fluxguide.sampling",
    "BaseGuidanceModel": "fluxguide.policies",
    "MLPGuidanceModel": "fluxguide.policies",
    "AttentionGuidanceModel": "fluxguide.policies",
    "ConvGuidanceModel": "fluxguide.policies",
    "create_mlp_guidance_model": "fluxguide.policies",
    "MultiObjectiveGuidance": "fluxguide.policies",
    "StepSpecificGuidance": "fluxguide.policies",
    "GuidanceModelTrainer": "fluxguide.algos",
    "StateCollectionCallback": "fluxguide.data",
    "create_training_pairs": "fluxguide.data",
    "GuidanceDataCollector": "fluxguide.data",
}

#: The seed's own module paths (thin aliases) and the names the seed documents there.
SEED_MODULES = {
    "fluxguide.sampling": ["denoise", "get_schedule", "apply_guidance_model"],
    "fluxguide.guidance_models": [
        "BaseGuidanceModel", "MLPGuidanceModel", "AttentionGuidanceModel", "ConvGuidanceModel",
        "GuidanceModelTrainer", "create_mlp_guidance_model", "MultiObjectiveGuidance", "StepSpecificGuidance",
    ],
    "fluxguide.sampling_instrumented": [
        "denoise_with_state_collection", "StateCollectionCallback", "create_training_pairs",
    ],
}


@pytest.mark.parametrize(("name", "home"), CANONICAL.items())
def test_seed_name_from_fluxguide_and_its_home(name: str, home: str) -> None:
    from_home = getattr(importlib.import_module(home), name)
    assert getattr(fluxguide, name) is from_home
    assert name in fluxguide.__all__ and name in dir(fluxguide)
    assert from_home.__module__.startswith(f"{home}."), f"{name} is defined outside its home {home}"


@pytest.mark.parametrize(("module", "names"), SEED_MODULES.items())
def test_seed_module_paths(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    for name in names:
        assert getattr(mod, name) is getattr(importlib.import_module(CANONICAL[name]), name), f"{module}.{name}"


def test_no_other_folder_reexports_a_seed_name() -> None:
    """One canonical home: no other folder's namespace (``fluxguide/<folder>/__init__.py``) exports a seed name."""
    extra = []
    for info in pkgutil.iter_modules(fluxguide.__path__):
        if not info.ispkg:
            continue
        pkg = importlib.import_module(f"fluxguide.{info.name}")
        extra += [f"fluxguide.{info.name}.{n}" for n in CANONICAL
                  if CANONICAL[n] != pkg.__name__ and n in vars(pkg)]
    assert not extra, f"seed names exported outside their canonical home: {extra}"


def test_public_api_resolves_and_is_lazy() -> None:
    for name in fluxguide.__all__:
        assert getattr(fluxguide, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fluxguide.nope  # noqa: B018
    code = "import sys, fluxguide; print(sorted(m for m in sys.modules if m.startswith(('fluxguide.', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fluxguide.lazy']", f"import fluxguide imported {out} (only its lazy-attribute helper)"


def test_all_matches_the_lazy_map() -> None:
    assert set(fluxguide.__all__) == {"__version__", *fluxguide._EXPORTS}
