"""Resumable training checkpoints, shared by every training script.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<step>/`` holding everything a run needs to continue
as if it had never stopped::

    <name>.safetensors            weights of each module (a guidance model's file also carries its config,
                                  so ``fluxguide.policies.load_guidance_model`` opens it directly)
    optimizer-<name>.safetensors  each optimizer's tensors; the rest of its state dict is in the metadata
    rng.safetensors               torch's global CPU (and CUDA) RNG states and any named torch.Generator
    state.json                    step, the caller's JSON state (config, counters, metric history), the
                                  numpy and Python RNG states, a SHA-256 manifest of every other file, and
                                  the SHA-256 of its own values (so an edited counter is refused too)

The folder is written under a temporary name and renamed into place, so a run killed mid-save leaves either
the previous checkpoints or the new one, never half of one. Loading checks the manifest, so a corrupt or
truncated checkpoint, an edited ``state.json`` or a file the manifest does not list raises
:class:`CheckpointError` naming the file and the fix instead of loading garbage.
Saving refuses modules with NaN/inf parameters (:class:`CheckpointError`): a diverged run never overwrites its
last good state. Nothing is pickled: tensors go to safetensors, everything else to JSON.

Usage::

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, modules={"policy": policy}, optimizers={"policy": opt}).state
    ...
    save_checkpoint(run_dir, step, modules={"policy": policy}, optimizers={"policy": opt},
                    state={"samples_seen": n, "config": asdict(cfg)})
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fluxguide.errors import UserError
from fluxguide.serialization import json_digest, refuse_links, sha256_file

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
RNG_FILE = "rng.safetensors"
FORMAT = "fluxguide-checkpoint"
#: 2: ``state.json`` holds its own SHA-256 (:data:`STATE_DIGEST_KEY`). Version 1 manifests (written before,
#: e.g. tests/fixtures/legacy) hash only the other files: they load with that rule, as they always did.
VERSION = 2
#: The ``state.json`` key of the SHA-256 of its other values (:func:`fluxguide.serialization.json_digest`).
STATE_DIGEST_KEY = "state_sha256"
#: Metadata key under which a module's ``config`` is stored (the key ``fluxguide.policies`` reads).
CONFIG_METADATA_KEY = "fluxguide_guidance_config"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written (non-finite weights) or read (missing, corrupt, or mismatched)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, its step and the caller's JSON state."""

    path: Path
    step: int
    state: dict[str, Any]


# ------------------------------------------------------------------------------------------ tree encoding
def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (replaced by a reference).

    Handles the containers of a ``state_dict``: dicts (any hashable primitive keys), lists, tuples, tensors,
    numbers, strings, ``None``. Dicts with non-string keys and tuples are tagged so they round-trip exactly.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_tree(k, tensors, f"{prefix}.key{i}"), encode_tree(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(
        f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint without pickling it: use tensors, "
        f"numbers, strings, lists, tuples and dicts"
    )


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_tree`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- helpers
def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must use only letters, digits, '_', '-' and '.' (it names a file)")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (temporary folders of a killed save excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    refuse_links(root)  # a link planted in the run folder is never resumed from, written into or pruned
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    for _, p in found:
        refuse_links(p)
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of ``run_dir``, or ``None`` when the run has none yet."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_finite_module(name: str, module: nn.Module) -> None:
    """Raise :class:`CheckpointError` if any parameter or buffer of ``module`` holds NaN or inf."""
    for pname, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"refusing to checkpoint {name!r}: its tensor {pname!r} holds NaN/inf values, so the run has "
                f"diverged; the previous checkpoint is kept. Lower the learning rate or clip gradients."
            )


# ------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    modules: Mapping[str, nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    state: Mapping[str, Any] | None = None,
    keep: int | None = 3,
) -> Path:
    """Write a checkpoint of ``step`` atomically and return its folder.

    Args:
        run_dir: the run folder; checkpoints go to ``<run_dir>/checkpoints/step_<step>``.
        step: the number of updates done (what a resumed run starts counting from).
        modules: named modules whose ``state_dict`` to save (e.g. ``{"policy": policy}``). A module with a
            ``config`` dict (every fluxguide guidance model) stores it in its file's metadata.
        optimizers: named optimizers whose ``state_dict`` to save.
        generators: named ``torch.Generator``s whose state to save (the global torch, numpy and Python RNGs
            are always saved).
        state: JSON-serialisable values (config, counters, metric history, ...), returned by
            :func:`load_checkpoint`.
        keep: keep only the newest ``keep`` checkpoints (``None`` keeps all).

    Raises:
        CheckpointError: a module has NaN/inf parameters (nothing is written).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    modules, optimizers, generators = dict(modules or {}), dict(optimizers or {}), dict(generators or {})
    for kind, names in (("module", modules), ("optimizer", optimizers), ("generator", generators)):
        for name in names:
            _check_name(kind, name)
    for name, module in modules.items():
        check_finite_module(name, module)
    try:
        user_state = json.loads(json.dumps(dict(state or {}), allow_nan=True))
    except TypeError as e:
        raise TypeError(f"checkpoint state must be JSON-serialisable: {e}") from e

    root = Path(run_dir) / CHECKPOINTS_DIR
    refuse_links(root / step_dir_name(step), root=run_dir)  # a planted link would take the checkpoint elsewhere
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{step_dir_name(step)}-"))
    try:
        files: list[str] = []
        for name, module in modules.items():
            config = getattr(module, "config", None)
            metadata = {CONFIG_METADATA_KEY: json.dumps(config)} if isinstance(config, dict) else None
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata=metadata)
            files.append(f"{name}.safetensors")
        for name, optimizer in optimizers.items():
            tensors: dict[str, torch.Tensor] = {}
            structure = encode_tree(optimizer.state_dict(), tensors, "optimizer")
            save_file(tensors, str(tmp / f"optimizer-{name}.safetensors"),
                      metadata={"structure": json.dumps(structure)})
            files.append(f"optimizer-{name}.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        rng.update({f"generator.{name}": g.get_state() for name, g in generators.items()})
        save_file(rng, str(tmp / RNG_FILE))
        files.append(RNG_FILE)
        np_state = np.random.get_state()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "state": user_state,
            "modules": sorted(modules),
            "optimizers": sorted(optimizers),
            "generators": sorted(generators),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python_rng": encode_tree(random.getstate(), {}, "python_rng"),
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files},
        }
        manifest = json.loads(json.dumps(manifest, allow_nan=True))  # the values as load_checkpoint reads them
        manifest[STATE_DIGEST_KEY] = json_digest(manifest, without=STATE_DIGEST_KEY)
        (tmp / STATE_FILE).write_text(json.dumps(manifest, indent=1, allow_nan=True))
        final = root / step_dir_name(step)
        if final.exists():  # the same step saved again (e.g. by a resumed run): swap it out
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------- load
def recovery_advice(path: str | Path) -> str:
    """What to do about the unusable checkpoint folder ``path``, losing nothing (the end of every load error).

    Deleting it makes the rerun resume from the run's previous checkpoint: the updates after that one are redone
    and their metrics records rewritten, nothing else is lost. But deleting the run's only checkpoint would make
    the rerun start the run afresh, which rewrites the run folder's metrics from the start: the advice is then to
    move the run folder aside (it keeps everything) and start afresh in a new one.
    """
    path = Path(path)
    run_dir = path.parent.parent
    try:
        found = list_checkpoints(run_dir) if path.parent.name == CHECKPOINTS_DIR else []
    except OSError:  # e.g. a link planted in the run folder
        found = []
    if path not in found:
        return f"restore {path} from a backup, or use an intact copy"
    earlier, later = found[: found.index(path)], found[found.index(path) + 1 :]
    if later:
        return f"delete {path}: the run resumes from its latest checkpoint, {later[-1]}, and loses nothing"
    if earlier:
        return (f"delete {path} to resume from the previous checkpoint, {earlier[-1]} (the updates after it are "
                f"redone and their metrics rewritten; nothing else is lost)")
    return (f"{path} is the run's only checkpoint: deleting it would restart the run and rewrite its metrics; to "
            f"keep them, move the run folder aside (mv {run_dir} {run_dir}.damaged) and rerun to start afresh, or "
            f"restore {path} from a backup")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``state.json`` of checkpoint folder ``path``, checked for format and against its own SHA-256
    (cheap: the other files are hashed by :func:`verify_checkpoint`).

    Raises:
        CheckpointError: missing folder or file, not a fluxguide checkpoint, or an edited ``state.json``.
    """
    path = Path(path)
    fix = recovery_advice(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {STATE_FILE} is missing; {fix}")
    try:
        manifest = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_FILE} is not valid JSON ({e}); {fix}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{STATE_FILE} is not a {FORMAT} manifest; {fix}")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {manifest['version']}, newer than this fluxguide's {VERSION}: "
            f"upgrade fluxguide"
        )
    if manifest.get("version", 1) >= 2 and manifest.get(STATE_DIGEST_KEY) != json_digest(manifest, STATE_DIGEST_KEY):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {STATE_FILE} does not match its SHA-256 (its values were edited or "
            f"damaged: counters, configuration or RNG states cannot be trusted); {fix}"
        )
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of checkpoint ``path`` against its SHA-256 manifest; return the manifest.

    Raises:
        CheckpointError: naming the missing or corrupt file and what to do.
    """
    path = Path(path)
    manifest = read_manifest(path)
    fix = recovery_advice(path)
    listed = {STATE_FILE, *manifest["files"]}
    for f in sorted(path.rglob("*")):
        if str(f.relative_to(path)) not in listed:
            raise CheckpointError(
                f"checkpoint {path} holds {f.relative_to(path)}, which is not in its manifest ({STATE_FILE}): "
                f"a checkpoint is written whole and never added to; remove that file if you put it there, else {fix}"
            )
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; {fix}")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match its SHA-256 in {STATE_FILE} "
                f"(truncated or overwritten); {fix}"
            )
    return manifest


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); {recovery_advice(path.parent)}") from e


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_global_rng: bool = True,
) -> Checkpoint:
    """Load checkpoint folder ``path`` into the given objects (in place) and return its step and state.

    Args:
        path: a folder returned by :func:`save_checkpoint` / :func:`latest_checkpoint`.
        modules, optimizers, generators: the objects to restore, under the names they were saved with. Saved
            entries not asked for are ignored; asking for one that was not saved is an error.
        restore_global_rng: also restore torch's, numpy's and Python's global RNG states.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt, or does not fit the objects (e.g. the
            architecture changed since it was written).
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    for kind, wanted, saved in (
        ("module", modules or {}, manifest["modules"]),
        ("optimizer", optimizers or {}, manifest["optimizers"]),
        ("generator", generators or {}, manifest["generators"]),
    ):
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint {path} has no {kind} named {missing}; it holds {saved}")
    for name, module in (modules or {}).items():
        tensors, _ = _load_tensors(path / f"{name}.safetensors")
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit module {name!r} ({e}); was the model configuration changed "
                f"since the run started? Use a new run folder for a new configuration"
            ) from e
    for name, optimizer in (optimizers or {}).items():
        tensors, metadata = _load_tensors(path / f"optimizer-{name}.safetensors")
        try:
            optimizer.load_state_dict(decode_tree(json.loads(metadata["structure"]), tensors))
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit optimizer {name!r} ({e})") from e
    rng, _ = _load_tensors(path / RNG_FILE)
    for name, generator in (generators or {}).items():
        generator.set_state(rng[f"generator.{name}"])
    if restore_global_rng:
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        np_state = manifest["numpy_rng"]
        np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
        random.setstate(decode_tree(manifest["python_rng"], {}))
    return Checkpoint(path=path, step=int(manifest["step"]), state=manifest["state"])
