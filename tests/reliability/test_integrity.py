"""Integrity end to end (issue 27): a resumed run's options are compared with those its checkpoint recorded, and
behaviour cloning compares the dataset's backbone fingerprint with the loaded base model's. Each refusal is one
line naming the flag or the dataset and the fix (exit 2)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.harness.cli import cli
from fluxguide.harness.config import RESUME_MAY_CHANGE, ConfigError, check_resume_config

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
