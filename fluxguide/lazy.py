"""Lazy package attributes (PEP 562): a package's public names import their defining module on first use.

The façade (``fluxguide``) and ``fluxguide.backbones`` use it, so ``import fluxguide`` loads nothing else and
shapes-world users never pay for diffusers and transformers, which the Flux backbone imports.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_attributes(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``exports`` maps a public name to the module that defines
    it (imported, and the value kept in the package, the first time the name is read); ``submodules`` are reachable
    as attributes without importing them first.

    Use as ``__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)`` at the end of the package's
    ``__init__``.
    """
    module = sys.modules[package]
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(module, name, value)  # later lookups skip this hook
            return value
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(module), *getattr(module, "__all__", ()), *subs})

    return __getattr__, __dir__
