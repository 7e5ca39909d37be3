"""What the script tests share."""

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.scripts import run_script


def leaf_fields(cls) -> list[dataclasses.Field]:
    """The fields of a script's ``Config`` with its nested groups' fields in their place (their flags carry no
    prefix: ``--seed``, not ``--run.seed``)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out += leaf_fields(type(default)) if dataclasses.is_dataclass(default) else [f]
    return out


def saved_start_policy(folder: Path) -> tuple[nn.Module, Path]:
    """A small non-zero attention policy for the shapes-random world, as a distilled start is, and the file it is
    saved in (``folder/start.safetensors``): the ``--init-policy`` of the scripts' distilled-start tests."""
    from fluxguide.backbones.registry import build_backbone
    from fluxguide.policies import save_guidance_model
    from fluxguide.policies.registry import build_policy

    start = build_policy("attention", build_backbone("shapes-random", seed=0), hidden_dim=16, num_layers=1,
                         num_heads=2)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return start, save_guidance_model(start, folder / "start.safetensors")


def kill_when(argv: list[str], ready: Callable[[], bool], interval: float = 0.01) -> None:
    """Run ``argv`` in a subprocess (one thread, output discarded) and SIGKILL it as soon as ``ready()`` holds (or
    it ends, or two minutes pass): a user's process killed mid-way, for the rerun-continues tests."""
    proc = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(interval)
    proc.kill()
    proc.wait()


def check_killed_run_resumes(script: ModuleType, argv: list[str], tmp_path: Path, total: int,
                             curves: Iterable[str]) -> Path:
    """A training script's run to update ``total`` (``argv`` sets it), killed (SIGKILL) in a subprocess as soon as
    its first checkpoint exists and rerun, ends exactly where one uninterrupted run ends: every update logged once,
    the same ``curves``, its last checkpoint at ``total``. Returns the resumed run's folder."""
    run_script(script, argv + ["--run-dir", str(tmp_path / "reference")])
    reference = read_metrics(tmp_path / "reference")

    run_dir = tmp_path / "killed"
    kill_when([sys.executable, script.__file__, *argv, "--run-dir", str(run_dir)],
              lambda: latest_checkpoint(run_dir) is not None)
    killed_at = load_checkpoint(latest_checkpoint(run_dir), restore_global_rng=False).step
    assert 2 <= killed_at < total, f"the run was not killed mid-way (last checkpoint at update {killed_at})"

    run_script(script, argv + ["--run-dir", str(run_dir)])  # resumes from the checkpoint
    resumed = read_metrics(run_dir)
    assert metric_curve(resumed, "charts/updates")[1] == list(range(1, total + 1))  # no update lost or repeated
    for name in curves:
        xs, ys = metric_curve(resumed, name)
        ref_xs, ref_ys = metric_curve(reference, name)
        assert xs == ref_xs
        assert ys == pytest.approx(ref_ys, rel=1e-5, abs=1e-7), name
    assert load_checkpoint(latest_checkpoint(run_dir), restore_global_rng=False).step == total
    return run_dir
