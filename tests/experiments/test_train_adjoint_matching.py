"""The Adjoint Matching script end to end: one update writes its files, a longer rerun resumes, the tiny random
Flux code path completes, and a bad option stops at once naming its flag."""

from __future__ import annotations

import math
from functools import partial

import pytest

from fluxguide.checkpointing import latest_checkpoint, load_checkpoint
from fluxguide.harness.config import ConfigError
from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.scripts import load_script, open_world_eval_metrics, run_script

script = load_script("train_adjoint_matching")
run = partial(run_script, script)

#: Tiny sizes: every code path of the loop in seconds.
TINY = ["--batch-size", "2", "--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1",
        "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode",
        "disabled", "--time-subsample", "2"]
SMALL = ["--backbone", "shapes-random", *TINY]


def test_one_update_writes_its_files_and_a_longer_rerun_resumes(tmp_path, capsys) -> None:
    run(SMALL + ["--run-dir", str(tmp_path), "--total-updates", "1"])
    assert load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).step == 1
    assert (tmp_path / "guidance.safetensors").is_file()
    records = read_metrics(tmp_path)
    for name in ("train/reward_mean", "train/control_cost", "losses/loss", "eval/verifier_pass_rate"):
        values = metric_curve(records, name)[1]
        assert values and all(math.isfinite(v) for v in values), name
    assert metric_curve(records, "train/control_cost")[1] == [0.0]  # a fresh policy's correction is zero

    capsys.readouterr()
    run(SMALL + ["--run-dir", str(tmp_path), "--total-updates", "2"])
    assert "resuming" in capsys.readouterr().out
    assert metric_curve(read_metrics(tmp_path), "charts/updates")[1] == [1, 2]  # no update lost or repeated
    assert load_checkpoint(latest_checkpoint(tmp_path), restore_global_rng=False).step == 2


def test_tiny_flux_run_completes(tmp_path) -> None:
    final = run(["--backbone", "tiny-flux", "--run-dir", str(tmp_path), "--total-updates", "1", *TINY])
    assert set(final) == open_world_eval_metrics("tiny-random-clip")  # no verifier for Flux
    losses = metric_curve(read_metrics(tmp_path), "losses/loss")[1]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert (tmp_path / "guidance.safetensors").is_file()


@pytest.mark.parametrize("flag, value", [("--reward-scale", "nan"), ("--reward-scale", "-1"),
                                         ("--time-subsample", "0"), ("--time-subsample", "4"),
                                         ("--weighting", "uniform")])
def test_a_bad_option_stops_at_once_naming_its_flag(tmp_path, flag, value) -> None:
    with pytest.raises(ConfigError, match=rf"^{flag} "):
        run(SMALL + ["--run-dir", str(tmp_path), flag, value])
    assert not list(tmp_path.iterdir())  # nothing was loaded or written


def test_a_distilled_start_is_tilted_not_unlearned(tmp_path) -> None:
    """--init-policy (--tilt-from init, the default): the base process is the initial policy's sampler, so with no
    reward there is nothing to learn (control cost and loss 0, the policy stays as loaded); --tilt-from base
    regresses the same start towards the base model's tilt, moving it at once."""
    from fluxguide.policies import load_guidance_model
    from tests.experiments import saved_start_policy

    start, path = saved_start_policy(tmp_path)
    args = [*SMALL, "--init-policy", str(path), "--reward-scale", "0", "--total-updates", "1"]
    run([*args, "--run-dir", str(tmp_path / "init")])
    records = read_metrics(tmp_path / "init")
    assert metric_curve(records, "train/control_cost")[1] == [0.0] and metric_curve(records, "losses/loss")[1] == [0.0]
    kept = load_guidance_model(tmp_path / "init" / "guidance.safetensors")
    assert all(a.equal(b) for a, b in zip(kept.state_dict().values(), start.state_dict().values()))

    run([*args, "--run-dir", str(tmp_path / "base"), "--tilt-from", "base"])
    assert metric_curve(read_metrics(tmp_path / "base"), "losses/loss")[1][0] > 0
