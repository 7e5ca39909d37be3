"""The training scripts under faults a user meets (issue 21): Ctrl-C saves and resumes without a lost or
duplicated metrics record, a second process on a run folder is refused, and bad options fail at once with the
flag and the value named, before anything is loaded or written."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.harness.cli import cli
from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.locking import LOCK_FILE
from tests.reliability import argv_of, training_records
from tests.scripts import SMALL_RUNS, SUBPROCESS_ENV, collect_small_dataset, load_script


@pytest.fixture(scope="module")
def bc_dataset(tmp_path_factory) -> Path:
    """The dataset of the behaviour-cloning runs here."""
    return collect_small_dataset(tmp_path_factory.mktemp("bc") / "data", env=SUBPROCESS_ENV)


@pytest.mark.parametrize("name", ["train_reward_gradient", "train_ppo", "train_bc"])
def test_sigint_saves_a_checkpoint_and_the_rerun_continues_without_lost_or_repeated_records(
        name: str, tmp_path: Path, bc_dataset: Path) -> None:
    total = 30
    argv = argv_of(name, tmp_path / "run", bc_dataset, "--total-updates", str(total), "--eval-every", "7",
                   "--checkpoint-every", "100")
    proc = subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not training_records(tmp_path / "run") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SIGINT received" in err
    assert "Resume with the same command" in out
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run"), restore_global_rng=False).step
    assert 1 <= saved < total, "the run was not interrupted mid-way"
    assert training_records(tmp_path / "run") == list(range(1, saved + 1))
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released on the way out

    subprocess.run(argv, env=SUBPROCESS_ENV, check=True, capture_output=True)
    records = read_metrics(tmp_path / "run")
    assert metric_curve(records, "charts/updates")[1] == list(range(1, total + 1))  # no update lost or repeated
    evals = [r["charts/samples_seen"] for r in records if any(k.startswith("eval/") for k in r)
             and not any(k == "eval/samples" for k in r)]
    assert len(evals) == len(set(evals))  # no evaluation repeated
    per_update = records[-1]["charts/samples_seen"] // total
    assert sorted(set(evals)) == [per_update * u for u in sorted({0, *range(7, total + 1, 7), total})]


def test_a_second_run_on_a_run_folder_is_refused_naming_the_owner(tmp_path: Path, bc_dataset: Path) -> None:
    argv = argv_of("train_reward_gradient", tmp_path / "run", bc_dataset, "--total-updates", "100000",
                   "--eval-every", "100000")
    first = subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not training_records(tmp_path / "run") and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True)
        assert second.returncode == 2
        assert f"the run folder {tmp_path / 'run'} is in use by another process (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the owner runs on, undisturbed
    finally:
        first.kill()
        first.wait()
    stale = subprocess.run(argv_of("train_reward_gradient", tmp_path / "run", bc_dataset, "--total-updates", "1"),
                           env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert stale.returncode == 0, stale.stderr
    assert f"left by pid {first.pid}" in stale.stderr and "is no longer running" in stale.stderr


BAD = [  # (flag, value) refused by every training script
    ("--batch-size", "0"), ("--batch-size", "-4"), ("--eval-every", "0"), ("--checkpoint-every", "0"),
    ("--total-updates", "-5"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "-0.001"), ("--threads", "0"),
    ("--num-steps", "0"), ("--eval-samples-per-prompt", "0"), ("--hidden-dim", "0"), ("--max-grad-norm", "0"),
    ("--total-samples", "0"), ("--time-budget-minutes", "-1"), ("--policy-min-t", "1.5"), ("--device", "cuda:7"),
    ("--device", "tpu"), ("--wandb-mode", "sometimes"),
]
OWN = {
    "train_reward_gradient": [("--grad-last-k", "0"), ("--reward-shift", "-1"), ("--control-cost", "-1")],
    "train_ppo": [("--samples-per-prompt", "0"), ("--epochs", "0"), ("--minibatch-trajectories", "0"),
                  ("--clip-epsilon", "0"), ("--std", "0"), ("--samples-per-prompt", "3")],
    "train_bc": [("--warmup-updates", "-1"), ("--init-policy", "missing.safetensors")],
}
CASES = [(name, f, v) for name in OWN for f, v in BAD + OWN[name]]


@pytest.mark.parametrize(("name", "flag", "value"), CASES, ids=[f"{n}{f}={v}" for n, f, v in CASES])
def test_a_bad_option_fails_at_once_naming_the_flag_and_the_value(name, flag, value, tmp_path, bc_dataset,
                                                                  capsys) -> None:
    script = load_script(name)
    args = argv_of(name, tmp_path / "run", bc_dataset, flag, value)[2:]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli(script.main, script.Config, args=args)
    assert e.value.code == 2
    message = capsys.readouterr().err
    shown = "-4" if value == "-4" else value
    assert flag in message and shown in message, message
    assert time.perf_counter() - start < 5  # before any model is loaded
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_cuda_without_a_gpu_and_an_unwritable_run_dir_fail_before_loading(tmp_path: Path, bc_dataset: Path) -> None:
    import torch

    script = load_script("train_reward_gradient")
    if not torch.cuda.is_available():
        proc = subprocess.run(argv_of("train_reward_gradient", tmp_path / "run", bc_dataset, "--device", "cuda"),
                              env=SUBPROCESS_ENV, capture_output=True, text=True)
        assert proc.returncode == 2 and "--device cuda: this machine has no usable CUDA GPU" in proc.stderr
        assert "Traceback" not in proc.stderr
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        cli(script.main, script.Config,
            args=SMALL_RUNS["train_reward_gradient"] + ["--run-dir", str(tmp_path / "file" / "run")])


@pytest.mark.parametrize(("name", "args", "expected"), [
    ("evaluate", ["--samples-per-prompt", "0"], "--samples-per-prompt 0"),
    ("evaluate", ["--rewards", "verifier", "verifier"], "--rewards lists verifier more than once"),
    ("evaluate", ["--device", "cuda:9"], "--device cuda:9"),
    ("compare", ["--parallel", "0"], "--parallel 0"),
    ("compare", ["--algorithms", "ppo", "ppo"], "--algorithms lists ppo more than once"),
    ("collect_data", ["--batch-size", "0"], "--batch-size 0"),
    ("collect_data", ["--episodes", "-1"], "--episodes -1"),
    ("collect_data", ["--top-k", "9", "--n", "2"], "--top-k 9"),
])
def test_other_scripts_refuse_bad_options_at_once(name, args, expected, tmp_path, capsys) -> None:
    script = load_script(name)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli(script.main, script.Config, args=[*args, "--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and expected in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_an_unwritable_out_dir_is_found_before_the_evaluation(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    script = load_script("evaluate")
    with pytest.raises(SystemExit):
        cli(script.main, script.Config, args=["--out-dir", str(tmp_path / "file" / "out")])
    assert f"--out-dir {tmp_path / 'file' / 'out'}: cannot write there" in capsys.readouterr().err
