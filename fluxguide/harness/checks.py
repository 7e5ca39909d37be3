"""The checks of option values, run by every config's ``validate()`` at start, before anything is loaded: each
raises a :class:`ConfigError` naming the flag, the value and the fix."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fluxguide.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad option value, found at start before anything is loaded; the message names the flag, the value and
    the fix."""


def flag(name: str) -> str:
    """The command-line flag of config field ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def check_int(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """``value`` is an integer >= ``minimum`` (or ``None`` if ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{flag(name)} {value!r}: must be {what}" + (" (or left out)" if optional else ""))


def check_float(name: str, value: Any, *, minimum: float = 0.0, strict: bool = True, maximum: float | None = None,
                optional: bool = False) -> None:
    """``value`` is a finite number > ``minimum`` (>= if not ``strict``; <= ``maximum``), or ``None`` if ``optional``."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
        raise ConfigError(f"{flag(name)} {value!r}: must be a finite number {bound}"
                          + (" (or left out)" if optional else ""))


def check_no_duplicates(name: str, values: Iterable[Any]) -> None:
    """``values`` holds no value twice (nothing is de-duplicated silently)."""
    values = list(values)
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ConfigError(f"{flag(name)} lists {', '.join(dupes)} more than once: list each once")


def check_device(name: str, device: str) -> None:
    """``device`` is a torch device this machine has (checked before any model is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{flag(name)} {device!r} is not a torch device ({e}): use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag(name)} {device}: this machine has no usable CUDA GPU "
                              "(torch.cuda.is_available() is False): use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag(name)} {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag(name)} {device}: MPS is not available on this machine: use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{flag(name)} {device}: unsupported device type {dev.type!r}: use 'cpu' or 'cuda'")


def check_writable_dir(name: str, path: Path) -> None:
    """``path`` is (or can be created as) a folder this process can write to: created, and a probe file written
    and removed, so an unwritable output folder is found before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag(name)} {path}: exists and is not a folder: choose a folder path")
    probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag(name)} {path}: cannot write there ({e.strerror or e}): choose a writable folder")\
            from None
