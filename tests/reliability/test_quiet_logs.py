"""A normal run of each script prints no warning that misdescribes what happened (issue 21).

Each script runs for one update on the pretrained shapes world with W&B offline (the defaults a user gets), and
its output is searched for warnings: open_clip's "initialized randomly" before the real weights load, Python
warnings, deprecation notices, error-looking log lines. W&B's own summary lines are what offline mode should
print and are allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
ENV.pop("PYTHONWARNINGS", None)
MISLEADING = re.compile(r"warn|initiali[sz]ed randomly|deprecat|traceback|\berror\b", re.IGNORECASE)
TINY = ["--num-steps", "4", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2",
        "--total-updates", "1"]


def output_of(script: str, *args: str) -> str:
    """What ``experiments/<script>.py args`` prints (stdout, then stderr); it must succeed."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{script}.py"), *args], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def misleading_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if MISLEADING.search(line)]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("quiet") / "data"
    output = output_of("collect_data", "--num-steps", "4", "--episodes", "4", "--batch-size", "4",
                       "--out-dir", str(path))
    return path, output


@pytest.mark.parametrize("script, args", [
    ("train_reward_gradient", ["--batch-size", "2"]),
    ("train_ppo", ["--batch-size", "4", "--samples-per-prompt", "2", "--minibatch-trajectories", "2"]),
    ("train_bc", ["--batch-size", "16", "--warmup-updates", "1"]),
])
def test_a_normal_training_run_prints_no_warning(script: str, args: list[str], collection, tmp_path: Path) -> None:
    data, collect_output = collection
    assert misleading_lines(collect_output) == []
    extra = ["--dataset", str(data)] if script == "train_bc" else []
    output = output_of(script, *TINY, *args, *extra, "--run-dir", str(tmp_path / "run"))
    assert misleading_lines(output) == []
    assert "wandb" in output  # offline W&B ran: its summary is the expected output, not a warning
