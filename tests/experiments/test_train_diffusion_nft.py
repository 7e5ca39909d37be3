"""The DiffusionNFT script end to end: a run stopped after one update and rerun continues exactly as an
uninterrupted one (the old policy included), the tiny random Flux code path completes, and a bad option stops at
once naming its flag."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from fluxguide.checkpointing import latest_checkpoint
from fluxguide.harness.config import ConfigError
from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.scripts import load_script, open_world_eval_metrics, run_script

script = load_script("train_diffusion_nft")
run = partial(run_script, script)

#: Tiny sizes: every code path of the loop in seconds.
TINY = ["--batch-size", "4", "--group-size", "2", "--num-steps", "3", "--time-subsample", "2", "--hidden-dim", "16",
        "--num-heads", "2", "--num-layers", "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1",
        "--grid-prompts", "2", "--wandb-mode", "disabled", "--eval-every", "1", "--checkpoint-every", "1"]
SMALL = ["--backbone", "shapes-random", *TINY]


def test_a_stopped_run_continues_exactly_like_an_uninterrupted_one(tmp_path, capsys) -> None:
    run(SMALL + ["--run-dir", str(tmp_path / "straight"), "--total-updates", "2"])
    run(SMALL + ["--run-dir", str(tmp_path / "resumed"), "--total-updates", "1"])
    capsys.readouterr()
    run(SMALL + ["--run-dir", str(tmp_path / "resumed"), "--total-updates", "2"])
    assert "resuming" in capsys.readouterr().out
    curves = [read_metrics(tmp_path / name) for name in ("straight", "resumed")]
    for name in ("train/reward_mean", "train/optimality_mean", "losses/loss_nft", "eval/verifier_pass_rate"):
        straight, resumed = (metric_curve(records, name)[1] for records in curves)
        assert straight == resumed and all(math.isfinite(v) for v in straight), name
    assert metric_curve(curves[1], "charts/updates")[1] == [1, 2]  # no update lost or repeated
    for module in ("policy", "old_policy"):  # the checkpoints' weights, bit for bit
        a, b = (load_file(latest_checkpoint(tmp_path / name) / f"{module}.safetensors") for name in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), module


def test_tiny_flux_run_completes(tmp_path) -> None:
    final = run(["--backbone", "tiny-flux", "--run-dir", str(tmp_path), "--total-updates", "1", *TINY])
    assert set(final) == open_world_eval_metrics("tiny-random-clip")  # no verifier for Flux
    assert math.isfinite(metric_curve(read_metrics(tmp_path), "losses/loss")[1][0])
    assert (tmp_path / "guidance.safetensors").is_file()


@pytest.mark.parametrize("flag, value", [("--beta", "0"), ("--group-size", "3"), ("--old-policy-decay", "1.5"),
                                         ("--advantage-clip", "nan"), ("--inner-steps", "0")])
def test_a_bad_option_stops_at_once_naming_its_flag(tmp_path, flag, value) -> None:
    match = "--batch-size" if flag == "--group-size" else flag  # 4 images do not split into groups of 3
    with pytest.raises(ConfigError, match=rf"^{match} "):
        run(SMALL + ["--run-dir", str(tmp_path), flag, value])
    assert not list(tmp_path.iterdir())  # nothing was loaded or written
