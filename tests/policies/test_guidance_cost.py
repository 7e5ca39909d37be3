"""The guidance-cost benchmark's Flux-dev numbers: MLP and conv guidance cost < 5% of a Flux forward."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "guidance_cost.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("guidance_cost", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_flux_dev_guidance_costs_are_small():
    bench = load_benchmark()
    rows = {r.name: r for r in bench.flux_dev_rows()}  # meta device: FLOPs counted, nothing allocated
    base = rows["base transformer"]
    assert 11.5e9 < base.params < 12.5e9  # Flux-dev's ~12 B parameters
    assert base.flops > 5e13
    for name in ("mlp", "conv"):
        assert 0 < rows[name].flops < bench.MAX_FLUX_FRACTION * base.flops, name
    assert 0 < rows["attention"].flops < base.flops
