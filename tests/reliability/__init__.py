"""What the reliability tests share: the training scripts' small runs as subprocess commands, the updates a run
has logged, and a stand-in for compute that must not run."""

from __future__ import annotations

import sys
from pathlib import Path

from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.scripts import ROOT, SMALL_RUNS


def argv_of(name: str, run_dir: Path, dataset: Path, *extra: str) -> list[str]:
    """The command line of ``experiments/<name>.py``'s small run in ``run_dir`` (``dataset``: behaviour cloning's)."""
    argv = [sys.executable, str(ROOT / "experiments" / f"{name}.py"), *SMALL_RUNS[name], "--run-dir", str(run_dir),
            *extra]
    return argv + (["--dataset", str(dataset)] if name == "train_bc" else [])


def training_records(run_dir: Path) -> list[int]:
    """The updates the run in ``run_dir`` has logged so far (``[]`` while its first line is being written)."""
    try:
        return metric_curve(read_metrics(run_dir), "charts/updates")[1]
    except ValueError:  # a line being written
        return []


def fail_if_called(*args: object, **kwargs: object) -> None:
    """Patched over a model's forward (or any costly step): a test whose input must be refused first fails here
    if the compute ran anyway."""
    raise AssertionError("compute was spent before the bad input was refused")
