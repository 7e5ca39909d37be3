"""Atomic writes of weights and metadata: a crash never leaves a half-written file under the final name; and the
SHA-256 digests that checkpoints and datasets record of what they wrote, to verify it on load."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates 0600 files; give the final file the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` (safetensors) via a temporary file and an atomic rename."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------ SHA-256 manifests
def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks: datasets and checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(data: Mapping[str, Any], without: str) -> str:
    """The SHA-256 of ``data`` as canonical JSON, leaving out key ``without``.

    A JSON manifest stores this under ``without`` to cover itself: the checkpoints' ``state.json`` and the
    datasets' ``manifest.json`` hash the other files, and an edit of a value in the manifest (a counter, a
    setting) changes this digest. It hashes the parsed values, not the text, so reindenting the file is no change.
    """
    body = {k: v for k, v in data.items() if k != without}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True, separators=(",", ":")).encode()).hexdigest()
