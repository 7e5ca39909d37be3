"""Which base model a run or dataset was made with, so a resume never mixes two of them.

A checkpoint of a guidance policy, or a dataset of target corrections, is only meaningful against the base
model it was trained or collected on: resuming a run after the backbone's weights changed (new shipped
shapes-world weights, another Flux checkpoint) would silently continue on a different problem, and a BC run
would keep the stale base / CFG reference pass rates. :func:`backbone_fingerprint` names the weights;
the training scripts store it in every checkpoint and refuse to resume under another one, and behaviour cloning
refuses a dataset collected under another one (:func:`check_fingerprint`, the one comparison of both).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from fluxguide.errors import UserError

SAMPLES_PER_TENSOR = 1024


class FingerprintError(UserError, RuntimeError):
    """A run or dataset was made against another base model than the one loaded now."""


def state_dict_digest(module: nn.Module, values_per_tensor: int | None = None) -> str:
    """SHA-256 of ``module``'s state dict: every name, shape and dtype, and the bytes of every value, or of up
    to ``values_per_tensor`` evenly spaced values of each tensor."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach()
        if values_per_tensor is not None:
            flat = t.reshape(-1)
            t = flat[:: max(1, flat.numel() // values_per_tensor)][:values_per_tensor]
        t = t.cpu().contiguous().reshape(-1)  # a 0-dim tensor (e.g. a learned log-std) cannot be viewed as bytes
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def backbone_fingerprint(model: nn.Module) -> str:
    """A short digest of the base model's weights: names, shapes, dtypes and up to 1,024 evenly spaced values
    of each tensor (cheap for a 12 B-parameter Flux, and any retraining changes the sampled values)."""
    return state_dict_digest(model, SAMPLES_PER_TENSOR)[:16]


def check_fingerprint(recorded: str | None, current: str, *, made: str, fix: str) -> None:
    """The one comparison of a recorded backbone fingerprint with the loaded base model's ``current`` one: raise
    :class:`FingerprintError` saying what was ``made`` (e.g. "<checkpoint> was trained") against which weights,
    and the ``fix``. A file written before fingerprints existed (``recorded`` is ``None``) passes."""
    if recorded is not None and recorded != current:
        raise FingerprintError(f"{made} against another base model (backbone fingerprint {recorded}; the one loaded "
                               f"now is {current}): {fix}")


def check_resume_fingerprint(saved: str | None, current: str, checkpoint: str | Path) -> None:
    """Raise if ``checkpoint`` was written against another base model than the one loaded now.

    Checkpoints written before fingerprints existed (``saved`` is ``None``) resume as before.
    """
    run_dir = Path(checkpoint).parent.parent
    check_fingerprint(saved, current, made=f"{checkpoint} was trained", fix=(
        f"its policy, optimizer and reference figures do not carry over. Start a new run with another --run-dir, "
        f"or delete {run_dir} to restart this one, or load the original weights (--weights-dir / --model-path)."))


def check_dataset_fingerprint(recorded: str | None, current: str, dataset: str | Path) -> None:
    """Raise if ``dataset`` (its metadata's ``backbone_fingerprint``) was collected against another base model
    than the one loaded now: its states and target corrections are that model's, so cloning them would train a
    policy for it. Datasets collected before fingerprints existed (``recorded`` is ``None``) load as before."""
    check_fingerprint(recorded, current, made=f"the dataset {dataset} was collected", fix=(
        "its states and target corrections belong to that model. Train with the base model it was collected with "
        "(the same --backbone, --weights-dir / --model-path, and for a random world the same --seed), or collect "
        "a dataset with this one (experiments/collect_data.py --out-dir NEW_FOLDER)."))
