"""Atomic writes of weights and metadata: a crash never leaves a half-written file under the final name; and the
SHA-256 digests that checkpoints and datasets record of what they wrote, to verify it on load.

No write goes through a symbolic link. A run or dataset folder may be shared (a group scratch disk): a link
planted there under a name fluxguide writes (``.owner.lock``, ``metrics.jsonl``, ``curves.png``,
``checkpoints/``, ...) would redirect the write to any file the user can write. So every writer opens its file
with ``O_NOFOLLOW`` (:func:`open_for_writing`) or writes a fresh temporary file renamed into place
(:func:`atomic_output`), and refuses a link at the file's name or at any folder between the folder the user
named (``root``, which may itself be a link: a run folder on a scratch disk) and the file, with
:class:`LinkRefusedError`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file

from fluxguide.errors import UserError


class LinkRefusedError(UserError, OSError):
    """fluxguide was to write at a symbolic link it did not create (see the module docstring)."""

    def __init__(self, link: str | Path) -> None:
        try:
            target = f" (to {os.readlink(link)})"
        except OSError:
            target = ""
        super().__init__(f"{link} is a symbolic link{target}, where fluxguide was to write: remove the link {link}; "
                         f"fluxguide never writes through links")


def refuse_links(path: str | Path, root: str | Path | None = None) -> None:
    """Raise :class:`LinkRefusedError` if ``path``, or any folder below ``root`` on the way to it, is a link.

    ``root`` is the folder the user named (not checked: it may be a link); ``path`` must lie under it. Without
    ``root`` only ``path`` itself is checked (its folder is the user's).
    """
    path = Path(path)
    checked = [path]
    if root is not None:
        parts = path.relative_to(root).parts
        checked = [Path(root).joinpath(*parts[: i + 1]) for i in range(len(parts))]
    for p in checked:
        if p.is_symlink():
            raise LinkRefusedError(p)


def open_no_follow(path: str | Path, flags: int, permissions: int = 0o666) -> int:
    """``os.open(path, flags)`` that refuses a link at ``path`` (:class:`LinkRefusedError`), even one planted
    after any check: the kernel refuses to follow it (``O_NOFOLLOW``)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, permissions)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkRefusedError(path) from None
        raise


def open_for_writing(path: str | Path, mode: str = "w", *, root: str | Path | None = None, **kwargs: Any) -> IO:
    """``open(path, mode)`` for writing (``"w"`` truncates, ``"a"`` appends; add ``"b"`` for bytes), creating the
    missing folders, and refusing links as :func:`refuse_links` does; ``kwargs`` go to :func:`open`."""
    if mode.replace("b", "") not in ("w", "a"):
        raise ValueError(f"open_for_writing writes ('w', 'a', 'wb', 'ab'), got mode {mode!r}")
    path = Path(path)
    refuse_links(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(open_no_follow(path, flags), mode, **kwargs)


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates 0600 files; give the final file the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


@contextmanager
def atomic_output(path: str | Path, *, root: str | Path | None = None) -> Iterator[str]:
    """A fresh temporary file next to ``path`` (its name) to write; renamed onto ``path`` when the block ends
    without an exception, removed otherwise. A link at ``path`` (or below ``root``) is refused, not replaced."""
    path = Path(path)
    refuse_links(path, root)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` (safetensors) via a temporary file and an atomic rename."""
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def write_text_atomic(text: str, path: str | Path, *, root: str | Path | None = None) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path, root=root) as tmp, open_for_writing(tmp) as f:
        f.write(text)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


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
