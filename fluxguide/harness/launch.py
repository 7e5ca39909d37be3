"""Training scripts run as subprocesses, one run folder each: what ``experiments/compare.py`` and
``experiments/reward_study.py`` share, and the one Python call that runs a registered algorithm's whole chain.

A run's scripts (an algorithm's stages: ``fluxguide.algos.registry.AlgorithmSpec.commands``) run one after the
other with one torch thread, their output appended to ``<run>/log.txt``. :func:`run_algorithm` marks each stage
that finished in its folder (:data:`STAGE_DONE`, with its command): rerun, it skips those and the first unfinished
stage resumes from its own folder (every script resumes from what it wrote). A script that refuses its options or
input exits with status 2 and one ``error: ...`` line (``fluxguide.harness.cli``): that line becomes the
:class:`~fluxguide.harness.config.ConfigError` raised here, so a study stops with the reason, not a log to read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fluxguide.algos.registry import AlgorithmSpec, get_algorithm
from fluxguide.harness.config import ConfigError
from fluxguide.serialization import open_for_writing

#: The file a finished stage leaves in its folder: the command it ran (a stage with another command runs again).
STAGE_DONE = "stage_done.json"


def refusal(log: Path) -> str:
    """The last ``error: ...`` line a script wrote to ``log`` (its refusal of an input), without the prefix."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else "refused its options"


def run_scripts(commands: Sequence[Sequence[str]], run_dir: Path, *, root: Path, label: str) -> float:
    """Run each command (a script and its arguments) with this Python, output appended to ``<run_dir>/log.txt``
    (never through a link below ``root``); returns the wall seconds.

    Raises:
        ConfigError: a script refused its options (exit status 2), with its one-line reason and ``label``.
        SystemExit: a script failed otherwise, naming the log.
    """
    start = time.perf_counter()
    log_path = run_dir / "log.txt"
    with open_for_writing(log_path, "a", root=root) as log:
        for argv in commands:
            log.write(f"$ python {' '.join(argv)}\n")
            log.flush()
            done = subprocess.run([sys.executable, *argv], check=False, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode == 2:  # the script refused an option or input: its one-line reason is the message
                raise ConfigError(f"{label}: {refusal(log_path)} (log: {log_path})")
            if done.returncode:
                raise SystemExit(f"{label} failed with exit code {done.returncode}: see {log_path}")
    return time.perf_counter() - start


def run_algorithm(algorithm: str | AlgorithmSpec, run_dir: str | Path, *, budget: str = "quick",
                  args: Sequence[str] = (), root: str | Path | None = None, progress: bool = True,
                  label: str | None = None) -> Path:
    """Run every stage of a registered algorithm in ``run_dir`` (e.g. ``reward-gradient-distilled``: collect, distil,
    fine-tune); returns the folder of the trained policy (``<folder>/guidance.safetensors``).

    Args:
        algorithm: a registered name, an entry-point name, a spec ``"pkg.module:SPEC"``, or the spec itself.
        budget: ``"smoke"``, ``"quick"`` (each script's default budget) or ``"full"``.
        args: options given to every stage (``--seed 1``, ``--wandb-mode disabled``, ``--weights-dir ...``).
        root: the folder below which no link is followed (default: ``run_dir``).
        progress: print a line per stage.
        label: how messages name the run (default: the algorithm's name); a stage of several is named after it.

    A stage whose folder holds :data:`STAGE_DONE` with the same command is skipped; the others run (and resume).
    """
    spec = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    run_dir = Path(run_dir)
    root = Path(root) if root is not None else run_dir
    for number, (stage, argv) in enumerate(zip(spec.stages, spec.commands(run_dir, list(args), budget)), start=1):
        marker = run_dir / stage.folder / STAGE_DONE
        name = label or spec.name
        name += f" stage {number}/{len(spec.stages)} ({stage.path.name})" if len(spec.stages) > 1 else ""
        if marker.is_file() and json.loads(marker.read_text()).get("command") == argv:
            if progress:
                print(f"{name}: done before ({marker}), skipped", flush=True)
            continue
        if progress:
            print(f"{name}: running in {run_dir / stage.folder} (output in {run_dir / 'log.txt'})", flush=True)
        seconds = run_scripts([argv], run_dir, root=root, label=name)
        with open_for_writing(marker, root=root) as f:
            json.dump({"command": argv, "seconds": seconds}, f)
        if progress:
            print(f"{name}: done in {seconds / 60:.1f} min", flush=True)
    return spec.training_run(run_dir)
