"""The training scripts under ``torchrun --nproc_per_node=2`` on the CPU (gloo), a few updates each.

Every run must end with both ranks holding the same weights (each rank prints the SHA-256 of its copy,
``fluxguide.distributed.check_in_sync``, and rank 0's ``guidance.safetensors`` hashes the same), log metrics
gathered over both ranks (``charts/world_size`` 2, samples seen growing by twice the per-rank batch, one record
per update) and leave one series of checkpoints, one W&B run (offline) and one ``metrics.jsonl``, all from
rank 0. A two-rank checkpoint then resumes in a plain single process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tyro

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.distributed import parameter_digest
from fluxguide.policies import load_guidance_model
from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.scripts import ROOT, load_script

NPROC = 2
#: The tiny settings of the script tests (tests/experiments), with W&B offline to count its runs.
TINY = ["--backbone", "shapes-random", "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1",
        "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode", "offline"]
# Not anchored to line starts: other ranks' output may share a line with a digest.
DIGEST = re.compile(r"rank (\d+)/(\d+): (\S+) sha256 ([0-9a-f]{64})")


def torchrun(script: str, argv: list[str]) -> dict[str, str]:
    """Run ``experiments/<script>.py`` on two gloo ranks; return each module's digest (checked equal on all ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           str(ROOT / "experiments" / f"{script}.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests: dict[str, dict[int, str]] = {}
    for r, world, name, digest in DIGEST.findall(proc.stdout):
        assert int(world) == NPROC
        digests.setdefault(name, {})[int(r)] = digest
    assert digests, f"no rank printed its digest:\n{proc.stdout[-2000:]}"
    for name, by_rank in digests.items():
        assert sorted(by_rank) == list(range(NPROC)), (name, by_rank)
        assert len(set(by_rank.values())) == 1, f"the ranks' {name} differ: {by_rank}"
    return {name: by_rank[0] for name, by_rank in digests.items()}


def check_rank0_files(run_dir: Path, updates: int, per_rank_batch: int) -> list[dict]:
    """One writer: one record per update with gathered metrics, one checkpoint series, one W&B run."""
    records = read_metrics(run_dir)
    xs, done = metric_curve(records, "charts/updates")
    assert done == list(range(1, updates + 1))  # a second writer would duplicate them
    assert xs == [NPROC * per_rank_batch * u for u in range(1, updates + 1)]  # both ranks' samples count
    assert metric_curve(records, "charts/world_size")[1] == [NPROC] * updates
    assert [p for p in run_dir.rglob("checkpoints") if p.is_dir()] == [run_dir / "checkpoints"]
    assert all(p.name.startswith("step_") for p in (run_dir / "checkpoints").iterdir())
    assert load_checkpoint(latest_checkpoint(run_dir), restore_global_rng=False).step == updates
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(list(run_dir.rglob("metrics.jsonl"))) == 1
    assert (run_dir / "guidance.safetensors").is_file()
    return records


def test_reward_gradient_on_two_ranks_then_resumed_on_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = TINY + ["--batch-size", "2", "--num-steps", "3", "--lr", "3e-3", "--eval-every", "2",
                   "--checkpoint-every", "2", "--run-dir", str(run_dir)]
    digests = torchrun("train_reward_gradient", argv + ["--total-updates", "3"])
    check_rank0_files(run_dir, 3, 2)
    assert parameter_digest(load_guidance_model(run_dir / "guidance.safetensors")) == digests["policy"]
    _, rewards = metric_curve(read_metrics(run_dir), "train/reward_std")
    assert all(r > 0 for r in rewards)  # pooled over both ranks' 4 images

    # Resume the two-rank checkpoint on one process: same update count and samples seen, then one more update.
    script = load_script("train_reward_gradient", module_name="torchrun_train_reward_gradient")
    script.main(tyro.cli(script.Config, args=argv + ["--total-updates", "4", "--wandb-mode", "disabled"]))
    records = read_metrics(run_dir)
    xs, done = metric_curve(records, "charts/updates")
    assert done == [1, 2, 3, 4] and xs == [4, 8, 12, 14]
    assert metric_curve(records, "charts/world_size")[1] == [2, 2, 2, 1]


def test_ppo_on_two_ranks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    torchrun("train_ppo", TINY + [
        "--batch-size", "4", "--samples-per-prompt", "2", "--minibatch-trajectories", "2", "--num-steps", "3",
        "--reward", "shapes-clip", "--total-updates", "2", "--eval-every", "2", "--checkpoint-every", "1",
        "--run-dir", str(run_dir),
    ])
    records = check_rank0_files(run_dir, 2, 4)
    for name in ("train/reward_mean", "train/group_reward_std", "losses/loss", "losses/first_mean_ratio"):
        assert len(metric_curve(records, name)[1]) == 2, name


def test_bc_on_two_ranks(tmp_path: Path) -> None:
    collect = load_script("collect_data", module_name="torchrun_collect_data")
    collect.main(tyro.cli(collect.Config, args=[
        "--backbone", "shapes-random", "--num-steps", "3", "--wandb-mode", "disabled", "--episodes", "4",
        "--batch-size", "4", "--out-dir", str(tmp_path / "data")]))
    run_dir = tmp_path / "run"
    digests = torchrun("train_bc", TINY + [
        "--dataset", str(tmp_path / "data"), "--batch-size", "8", "--warmup-updates", "1", "--total-updates", "3",
        "--eval-every", "3", "--checkpoint-every", "2", "--run-dir", str(run_dir),
    ])
    check_rank0_files(run_dir, 3, 8)
    assert "policy" in digests
