"""Training scripts run as subprocesses, one run folder each: what ``experiments/compare.py`` and
``experiments/reward_study.py`` share.

A run's scripts (an algorithm's stages: ``fluxguide.algos.registry.AlgorithmSpec.commands``) run one after the
other with one torch thread, their output appended to ``<run>/log.txt``. A script that refuses its options or
input exits with status 2 and one ``error: ...`` line (``fluxguide.harness.cli``): that line becomes the
:class:`~fluxguide.harness.config.ConfigError` raised here, so a study stops with the reason, not a log to read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fluxguide.harness.config import ConfigError
from fluxguide.serialization import open_for_writing


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
