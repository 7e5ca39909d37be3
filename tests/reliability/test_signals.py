"""Signals a user's process meets (issue 27): SIGHUP (a closed terminal or SSH session) saves a checkpoint like
SIGTERM, releases the run folder and the rerun resumes; a Ctrl-C during a collection says what the dataset kept."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.data.store import MANIFEST, GuidanceDataset
from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.locking import LOCK_FILE
from tests.reliability import argv_of, training_records
from tests.scripts import ROOT, SUBPROCESS_ENV

TOTAL = 30
#: Runs the command with the terminal on stdin as its controlling terminal (in a new session), like a shell would.
WITH_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                 "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def run_argv(run_dir: Path) -> list[str]:
    return argv_of("train_reward_gradient", run_dir, Path("unused"), "--total-updates", str(TOTAL),
                   "--eval-every", "7", "--checkpoint-every", "100")


def wait_for_training(run_dir: Path, proc: subprocess.Popen, drain: int | None = None) -> None:
    """Until the run has logged an update (reading the terminal ``drain`` meanwhile, so the run never blocks)."""
    deadline = time.time() + 180
    while not training_records(run_dir) and proc.poll() is None and time.time() < deadline:
        if drain is not None and select.select([drain], [], [], 0.01)[0]:
            os.read(drain, 1 << 16)
        else:
            time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"


def assert_saved_and_released(run_dir: Path) -> int:
    saved = load_checkpoint(latest_checkpoint(run_dir), restore_global_rng=False).step
    assert 1 <= saved < TOTAL, "the run was not interrupted mid-way"
    assert training_records(run_dir) == list(range(1, saved + 1))  # the update in flight was kept
    assert not (run_dir / LOCK_FILE).exists()  # released on the way out
    return saved


def test_sighup_saves_a_checkpoint_like_sigterm(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(run_argv(run), env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_training(run, proc)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "Traceback" not in err and "SIGHUP received" in err
    assert "interrupted by SIGHUP" in out and "Resume with the same command" in out
    assert_saved_and_released(run)


def test_a_closed_terminal_saves_a_checkpoint_and_the_rerun_resumes(tmp_path: Path) -> None:
    """The terminal goes away (its master side closes): the kernel sends SIGHUP and every later write to the
    terminal fails; the run still saves the update in flight, frees its folder and exits with 128 + SIGHUP."""
    run = tmp_path / "run"
    master, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", WITH_TERMINAL, *run_argv(run)[1:]], env=SUBPROCESS_ENV,
                                stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    finally:
        os.close(terminal)
    try:
        wait_for_training(run, proc, drain=master)
    finally:
        os.close(master)  # the terminal is closed: SIGHUP
    assert proc.wait(timeout=180) == 128 + signal.SIGHUP
    saved = assert_saved_and_released(run)

    done = subprocess.run(run_argv(run), check=False, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run / 'checkpoints' / f'step_{saved:09d}'}" in done.stdout
    records = read_metrics(run)
    assert metric_curve(records, "charts/updates")[1] == list(range(1, TOTAL + 1))  # no update lost or repeated


def chunks_listed(dataset: Path) -> int:
    try:
        return len(json.loads((dataset / MANIFEST).read_text())["chunks"])
    except (OSError, ValueError):
        return 0


def test_ctrl_c_during_a_collection_says_what_the_dataset_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = [sys.executable, str(ROOT / "experiments" / "collect_data.py"), "--backbone", "shapes-random",
            "--num-steps", "2", "--episodes", "4000", "--batch-size", "2", "--wandb-mode", "disabled",
            "--out-dir", str(data)]
    # Ctrl-C as a terminal sends it: to a process whose SIGINT is not ignored. A suite started in the background of
    # a non-interactive shell inherits SIGINT ignored (and Python then raises no KeyboardInterrupt), so reset it.
    proc = subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while chunks_listed(data) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    kept = GuidanceDataset(data)
    assert 1 <= kept.num_chunks < 2000, "the collection was not interrupted mid-way"
    assert "Traceback" not in err and "nothing new was written" not in err
    assert (f"the dataset at {data} keeps {kept.num_episodes} episodes in {kept.num_chunks} chunks, all written "
            f"by this run") in err
    assert "rerun the same command to collect the rest" in err
    assert not (data / LOCK_FILE).exists()
