"""Load and run the scripts of ``experiments/`` or ``benchmarks/`` in tests: one loader, one way to call a script's
``main`` the way its command line does, and the small-run settings the script tests share.

The scripts are not a package: they are run as files, as a user runs them, so a test loads each one as a module.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import tyro

ROOT = Path(__file__).resolve().parents[1]

#: The environment of a script run as a subprocess: one thread (the test machines share their cores), no W&B,
#: no download.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}

#: A small training run on the random shapes world: tiny networks, 3 sampling steps, a 2-prompt evaluation; every
#: code path of a training loop in seconds. A script's own flags (batch sizes, its algorithm's settings) follow.
SMALL_RUN = ["--backbone", "shapes-random", "--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2",
             "--num-layers", "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2",
             "--wandb-mode", "disabled"]

#: Each training script's small run: :data:`SMALL_RUN` and its algorithm's batch flags.
SMALL_RUNS = {
    "train_reward_gradient": [*SMALL_RUN, "--batch-size", "2"],
    "train_ppo": [*SMALL_RUN, "--batch-size", "4", "--samples-per-prompt", "2", "--minibatch-trajectories", "2",
                  "--reward", "shapes-clip"],
    "train_bc": [*SMALL_RUN, "--batch-size", "16", "--warmup-updates", "2"],
}

#: One update of a training script at the smallest sizes, for the tests of what a script refuses (``--backbone``
#: comes first, so that a case with its own backbone can drop it).
ONE_UPDATE = ["--backbone", "shapes-random", "--batch-size", "2", "--num-steps", "2", "--hidden-dim", "8",
              "--num-heads", "2", "--num-layers", "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1",
              "--grid-prompts", "2", "--wandb-mode", "disabled", "--total-updates", "1"]

#: The dataset of the behaviour-cloning runs: 8 episodes of 3 steps collected on the random shapes world.
SMALL_COLLECTION = ["--backbone", "shapes-random", "--num-steps", "3", "--episodes", "8", "--batch-size", "4",
                    "--wandb-mode", "disabled"]


def load_script(name: str | Path, folder: str = "experiments", *, module_name: str | None = None) -> ModuleType:
    """``<folder>/<name>.py`` (or the script file ``name`` when it is a path) as a fresh module registered as
    ``module_name`` (default: the file's stem), so dataclasses and pickling by module name work inside it."""
    path = name if isinstance(name, Path) else ROOT / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or path.stem, path)
    assert spec is not None and spec.loader is not None, f"no script {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(script: ModuleType, argv: list[str]) -> Any:
    """``script.main`` on the ``Config`` its command line ``argv`` parses to, in this process (what the script
    returns: a training script's final metrics, ``collect_data``'s dataset)."""
    return script.main(tyro.cli(script.Config, args=argv))


def collect_small_dataset(out_dir: Path, env: dict[str, str] | None = None) -> Path:
    """Run ``collect_data.py`` with :data:`SMALL_COLLECTION` into ``out_dir`` in a subprocess (``env``: its
    environment, default this process's); return ``out_dir``."""
    subprocess.run([sys.executable, str(ROOT / "experiments" / "collect_data.py"), *SMALL_COLLECTION,
                    "--out-dir", str(out_dir)], env=env, check=True, capture_output=True)
    return out_dir


def open_world_eval_metrics(reward: str) -> set[str]:
    """The held-out metrics of a run on a backbone without a verifier (tiny Flux, Flux): the trained reward (also under
    its own name, with its standard error) and the image count; no untrained reward, as an open world names none."""
    return {"eval/reward_mean", "eval/reward_std", "eval/images", f"eval/rewards/{reward}",
            f"eval/rewards_stderr/{reward}"}
