"""Recovery advice that loses nothing (issue 27): a corrupt checkpoint's message tells what to do for the case at
hand. With an earlier checkpoint, deleting the corrupt one resumes from it (the updates after it are redone);
when it is the run's only one, deleting it would restart the run and rewrite its metrics, so the message says to
move the run folder aside instead, and doing so keeps the old run whole."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from torch import nn

from fluxguide.checkpointing import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.reliability import argv_of
from tests.scripts import SUBPROCESS_ENV


def corrupt(checkpoint: Path) -> Path:
    """Flip the last byte of the checkpoint's first weights file."""
    weights = min(checkpoint.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return weights


def test_with_an_earlier_checkpoint_the_advice_is_to_delete_the_corrupt_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint(run, step, modules={"policy": nn.Linear(2, 2)})
    previous, latest = run / "checkpoints" / "step_000000002", latest_checkpoint(run)
    corrupt(latest)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(latest, modules={"policy": nn.Linear(2, 2)})
    assert f"delete {latest} to resume from the previous checkpoint, {previous}" in str(e.value)

    subprocess.run(["rm", "-r", str(latest)], check=True)  # what it says
    assert latest_checkpoint(run) == previous
    assert load_checkpoint(previous, modules={"policy": nn.Linear(2, 2)}).step == 2


def test_the_only_checkpoint_is_not_to_be_deleted_and_moving_the_run_aside_keeps_it_whole(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = argv_of("train_reward_gradient", run, Path("unused"), "--total-updates", "3", "--checkpoint-every", "100")
    subprocess.run(argv, env=SUBPROCESS_ENV, check=True, capture_output=True)
    only = latest_checkpoint(run)
    corrupt(only)
    metrics = (run / "metrics.jsonl").read_bytes()

    refused = subprocess.run(argv, env=SUBPROCESS_ENV, check=False, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    error = refused.stderr.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert "to resume from the previous checkpoint" not in error  # there is none: deleting it restarts the run
    assert f"{only} is the run's only checkpoint" in error
    moved = Path(f"{run}.damaged")
    assert f"mv {run} {moved}" in error
    assert (run / "metrics.jsonl").read_bytes() == metrics  # the refusal wrote nothing

    run.rename(moved)  # what it says: the rerun starts afresh in a new folder
    subprocess.run(argv, env=SUBPROCESS_ENV, check=True, capture_output=True)
    assert (moved / "metrics.jsonl").read_bytes() == metrics and (run / "metrics.jsonl").is_file()


def test_a_stop_on_a_non_finite_loss_says_what_the_rerun_does(tmp_path: Path) -> None:
    from fluxguide.harness.config import RunConfig
    from fluxguide.harness.run import Run

    def diverge() -> dict[str, float]:
        raise FloatingPointError("non-finite loss nan")

    cfg = RunConfig(run_dir=tmp_path / "run")
    with pytest.raises(SystemExit) as e:  # before the first checkpoint: there is nothing to resume from
        Run(cfg, cfg, name="test", hint="lower --lr").step(diverge)
    assert "Rerunning resumes" not in str(e.value)
    assert ("the run has no checkpoint yet, so rerunning starts it afresh and rewrites its metrics (use another "
            "--run-dir to keep them): lower --lr") in str(e.value)

    last = save_checkpoint(cfg.run_dir, 2, modules={"policy": nn.Linear(2, 2)})
    with pytest.raises(SystemExit) as e:
        Run(cfg, cfg, name="test", hint="lower --lr").step(diverge)
    assert (f"the last good checkpoint is {last}. Rerunning resumes from it: lower --lr, with --allow-config-change "
            f"to resume under the changed value") in str(e.value)
