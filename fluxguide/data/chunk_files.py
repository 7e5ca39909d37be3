"""What a dataset chunk folder on disk may hold, and the checks every load makes before trusting one.

A chunk is a ``TensorDict.memmap_`` folder: ``meta.json`` files describing plain tensors and one ``.memmap`` file
per tensor. tensordict's loader can also unpickle non-tensor leaves, so a shared dataset could run code when it
is loaded: :func:`check_memmap_folder` refuses anything but plain tensors before tensordict reads the folder, and
:func:`check_finite` names the file of a non-finite value once, at load (docs/design.md, "data").

The manifest records every file of a chunk with its size and SHA-256 (:func:`chunk_record`), and its own SHA-256
(:func:`signed`): :func:`check_chunk_files` and :func:`check_manifest_digest` find a flipped bit in a memory map,
reordered prompts of the same size, a planted file or an edited manifest. Chunks listed by a version 1 manifest
(written before the SHA-256s) keep the check they were written with: file sizes only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from fluxguide.errors import UserError
from fluxguide.serialization import json_digest, sha256_file

#: The manifest key of its own SHA-256 (:func:`fluxguide.serialization.json_digest` of its other values).
MANIFEST_DIGEST_KEY = "manifest_sha256"
#: The manifest key of how many of its first chunks a version 1 writer appended (checked by size only).
CHUNKS_BEFORE_SHA256 = "chunks_before_sha256"


class DatasetError(UserError, ValueError):
    """A dataset folder is missing, damaged, or does not fit what it is used with."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """No dataset at the path: the folder or its manifest is missing."""


def tensor_spec(td: TensorDict) -> dict[str, dict[str, Any]]:
    """Per-item shape and dtype of each entry (the batch dim removed)."""
    return {
        k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in sorted(td.items(include_nested=False, leaves_only=True))
    }


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def chunk_record(folder: Path) -> dict[str, dict[str, Any]]:
    """What a manifest entry records of a freshly written chunk folder: every file's size and SHA-256."""
    sizes = file_sizes(folder)
    return {"files": sizes, "sha256": {rel: sha256_file(folder / rel) for rel in sizes}}


def signed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` (as it will be read back) with its own SHA-256 under :data:`MANIFEST_DIGEST_KEY`."""
    manifest = json.loads(json.dumps(manifest))
    return {**manifest, MANIFEST_DIGEST_KEY: json_digest(manifest, MANIFEST_DIGEST_KEY)}


def check_manifest_digest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a version 2 manifest whose values do not match its own SHA-256 (always checked: it is cheap)."""
    if manifest["version"] >= 2 and manifest.get(MANIFEST_DIGEST_KEY) != json_digest(manifest, MANIFEST_DIGEST_KEY):
        raise DatasetError(
            f"{path} does not match its SHA-256 (its chunk list, file hashes or metadata were edited or damaged): "
            f"the dataset at {path.parent} cannot be trusted; restore the file or re-collect into a new folder"
        )


def check_chunk_files(folder: Path, entry: dict[str, Any], hashed: bool) -> None:
    """Check chunk ``folder`` against its manifest ``entry``: every file present with its size and, when
    ``hashed`` (appended by a version 2 writer), its SHA-256, and no file the entry does not list. Hashing reads
    the whole chunk (seconds per GB): ``GuidanceDataset(path, verify=False)`` skips this check."""
    dataset, sha256 = folder.parent, entry.get("sha256", {})
    fix = f"the dataset at {dataset} is damaged; restore the file or re-collect into a new folder"
    for rel, size in entry["files"].items():
        f = folder / rel
        if not f.is_file():
            raise DatasetError(f"dataset file {f} is missing (the manifest lists it, {size} bytes): {fix}")
        if f.stat().st_size != size:
            raise DatasetError(f"dataset file {f} is truncated or altered: {f.stat().st_size} bytes, the manifest "
                               f"says {size}; {fix}")
        if hashed and sha256_file(f) != sha256.get(rel):
            raise DatasetError(f"dataset file {f} does not match its SHA-256 in manifest.json (altered or damaged "
                               f"with its size kept: a flipped bit, reordered prompts); {fix}")
    unlisted = sorted(set(file_sizes(folder)) - set(entry["files"]))  # every writer listed every file
    if unlisted:
        raise DatasetError(f"dataset file {folder / unlisted[0]} is not in the manifest of {dataset}: a chunk is "
                           "written whole and never added to; remove the file if you put it there, else re-collect")


def fsync_tree(folder: Path) -> None:
    """Flush a freshly written folder to disk (files, then the folders), so a power cut cannot tear it."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: The only class a chunk's ``meta.json`` may name: a plain TensorDict (no tensorclass, no non-tensor leaf).
_TENSORDICT_TYPE = "<class 'tensordict._td.TensorDict'>"
_TENSOR_FIELDS = {"device", "shape", "dtype", "is_nested"}


def check_memmap_folder(folder: Path) -> None:
    """Refuse a memmap TensorDict folder holding anything but tensors, before tensordict reads it.

    tensordict's loader unpickles non-tensor leaves (``*.pickle``) and imports the class its ``meta.json``
    names, so a dataset shared between people could run code when loaded. Here every ``meta.json`` must name a
    plain TensorDict whose entries are tensors (a ``<key>.memmap`` file of a torch dtype) or nested
    TensorDicts (a sub-folder checked the same way), and the folder may hold no other file.

    Raises:
        DatasetError: naming the offending file.
    """
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{meta_path} is missing: the chunk is damaged") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{meta_path} is not valid JSON ({e}): the chunk is damaged") from None

    def refuse(what: str, path: Path) -> DatasetError:
        return DatasetError(
            f"{path}: {what}. A fluxguide dataset holds tensors only and is never unpickled (a pickled field could "
            "run code when loaded); refusing to load it. Re-collect the data with experiments/collect_data.py, or "
            "inspect the file if you trust where it came from"
        )

    if not isinstance(meta, dict) or meta.get("_type") != _TENSORDICT_TYPE:
        raise refuse(f"names the class {meta.get('_type') if isinstance(meta, dict) else meta!r}, not a plain "
                     "TensorDict", meta_path)
    expected = {"meta.json"}
    for key, entry in meta.items():
        if key in ("shape", "device", "_type"):
            continue
        if isinstance(entry, dict) and entry == {"type": "TensorDict"}:
            if not (folder / key).is_dir():
                raise refuse(f"lists the nested TensorDict {key!r} but has no folder for it", meta_path)
            check_memmap_folder(folder / key)
            expected.add(key)
            continue
        dtype = entry.get("dtype", "") if isinstance(entry, dict) else ""
        if not (isinstance(entry, dict) and set(entry) <= _TENSOR_FIELDS and "shape" in entry
                and isinstance(getattr(torch, str(dtype).removeprefix("torch."), None), torch.dtype)
                and not entry.get("is_nested")):
            raise refuse(f"entry {key!r} is not a tensor ({json.dumps(entry)[:120]})", meta_path)
        expected.add(f"{key}.memmap")
    for p in folder.iterdir():
        if p.name not in expected:
            raise refuse("is not part of a tensors-only chunk (only meta.json and <key>.memmap files are)", p)


def check_finite(td: TensorDict, folder: Path) -> None:
    """Refuse non-finite values in a chunk's floating tensors, naming the file: a NaN target would otherwise
    surface much later as a diverging loss that looks like a learning-rate problem."""
    for key, value in td.items(include_nested=True, leaves_only=True):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                name = "/".join(key) if isinstance(key, tuple) else key
                bad = int((~finite).sum())
                raise DatasetError(
                    f"{folder / name}.memmap holds {bad} non-finite value(s) (NaN / inf) of {value.numel()}: the "
                    "data was collected from a diverged teacher or is damaged; re-collect this chunk (delete the "
                    "dataset folder or collect into a new one) rather than training on it"
                )
