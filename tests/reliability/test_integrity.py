"""Integrity end to end (issue 27): a resumed run's options are compared with those its checkpoint recorded, and
behaviour cloning compares the dataset's backbone fingerprint with the loaded base model's. Each refusal is one
line naming the flag or the dataset and the fix (exit 2)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.data.store import GuidanceDataset
from fluxguide.harness.cli import cli
from fluxguide.harness.config import RESUME_MAY_CHANGE, ConfigError, check_resume_config
from fluxguide.provenance import FingerprintError, check_dataset_fingerprint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--backbone", "shapes-random", "--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2", "--num-layers",
         "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2",
         "--wandb-mode", "disabled"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def run_cli(script, argv: list[str]) -> None:
    cli(script.main, script.Config, args=argv)


def test_a_resume_with_a_changed_option_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = load_script("train_reward_gradient")
    argv = [*SMALL, "--batch-size", "2", "--run-dir", str(tmp_path), "--eval-every", "100"]
    run_cli(script, [*argv, "--total-updates", "1"])
    capsys.readouterr()
    # A longer budget and another checkpoint cadence are what resuming is for; the learning rate is not.
    again = [*argv, "--total-updates", "2", "--checkpoint-every", "1", "--lr", "0.003"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(script, again)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "--lr: recorded 0.01, given 0.003" in err
    assert "--total-updates" not in err and "--checkpoint-every" not in err
    assert "--allow-config-change" in err and "another --run-dir" in err
    assert latest_checkpoint(tmp_path).name == "step_000000001"  # nothing was trained or written

    run_cli(script, [*again, "--allow-config-change"])  # the explicit option resumes with the new value
    assert "resuming with changed options" in capsys.readouterr().out
    state = load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False)
    assert state.step == 2 and state.state["config"]["lr"] == 0.003


def test_the_resume_comparison_accepts_older_checkpoints_and_what_may_change() -> None:
    current = {"lr": 0.01, "hidden_dim": 16, "total_updates": 9, "device": "cpu", "new_flag": 3,
               "init_policy": None, "eval_prompts": "shapes-heldout"}
    recorded = {"lr": 0.01, "hidden_dim": 16, "total_updates": 2, "device": "cuda", "removed_flag": 1,
                "init_policy": None, "eval_prompts": "shapes-heldout"}
    ckpt = Path("run/checkpoints/step_000000002")
    assert check_resume_config(None, current, ckpt, allow=False) == []  # a checkpoint without a config
    assert check_resume_config(recorded, current, ckpt, allow=False) == []  # flags added or removed since: no change
    recorded["hidden_dim"], recorded["eval_prompts"] = 64, "prompts.txt"
    with pytest.raises(ConfigError, match=r"--eval-prompts: recorded 'prompts.txt', given 'shapes-heldout'; "
                                          r"--hidden-dim: recorded 64, given 16\)"):
        check_resume_config(recorded, current, ckpt, allow=False)
    assert len(check_resume_config(recorded, current, ckpt, allow=True)) == 2
    assert {"total_updates", "run_dir", "device", "allow_config_change"} <= set(RESUME_MAY_CHANGE)
    assert all(reason for reason in RESUME_MAY_CHANGE.values())


def test_bc_refuses_a_dataset_of_another_base_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    collect_data, train_bc = load_script("collect_data"), load_script("train_bc")
    data = tmp_path / "data"
    run_cli(collect_data, ["--backbone", "shapes-random", "--num-steps", "3", "--wandb-mode", "disabled",
                           "--prompt-swaps", "0", "--episodes", "4", "--batch-size", "4", "--out-dir", str(data)])
    recorded = GuidanceDataset(data).metadata["backbone_fingerprint"]
    capsys.readouterr()
    # The random shapes world follows --seed: seed 1 is another base model than the one the data was collected on.
    with pytest.raises(SystemExit) as exit_:
        run_cli(train_bc, [*SMALL, "--batch-size", "16", "--warmup-updates", "2", "--dataset", str(data), "--run-dir",
                           str(tmp_path / "run"), "--total-updates", "1", "--seed", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"the dataset {data} was collected against another base model (backbone fingerprint {recorded}; " in err
    assert "collect a dataset with this one" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_fingerprint_absent_from_a_file_is_no_mismatch() -> None:
    check_dataset_fingerprint(None, "abc", "old-dataset")  # collected before fingerprints: loads as before
    check_dataset_fingerprint("abc", "abc", "data")
    with pytest.raises(FingerprintError, match=r"data was collected .*fingerprint abc; the one loaded now is xyz"):
        check_dataset_fingerprint("abc", "xyz", "data")
