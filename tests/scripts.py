"""Load a script of ``experiments/`` or ``benchmarks/`` as a module, so a test calls its ``main`` and ``Config``.

One loader for every test (the scripts are not a package: they are run as files, as a user runs them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, folder: str = "experiments", *, module_name: str | None = None) -> ModuleType:
    """``<folder>/<name>.py`` as a fresh module registered as ``module_name`` (default: ``name``), so dataclasses
    and pickling by module name work inside it."""
    spec = importlib.util.spec_from_file_location(module_name or name, ROOT / folder / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"no script {folder}/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
