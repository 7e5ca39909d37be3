"""One Python call runs a registered algorithm's whole chain, and a rerun resumes where it stopped (issue 29)."""

from __future__ import annotations

import json

import pytest

from fluxguide.harness.config import ConfigError
from fluxguide.harness.launch import STAGE_DONE, run_algorithm
from fluxguide.harness.tracking import read_metrics


def test_the_distilled_chain_runs_in_one_call_and_a_rerun_resumes_the_stage_that_stopped(tmp_path, capsys) -> None:
    run = tmp_path / "chain"
    args = ["--wandb-mode", "disabled", "--seed", "3"]
    policy_dir = run_algorithm("reward-gradient-distilled", run, budget="smoke", args=args)
    assert policy_dir == run / "rl" and (policy_dir / "guidance.safetensors").is_file()
    for folder in ("data", "bc", "rl"):
        assert (run / folder / STAGE_DONE).is_file(), folder
    # the fine-tuning stage started from the distilled network the BC stage wrote
    rl_command = json.loads((run / "rl" / STAGE_DONE).read_text())["command"]
    assert rl_command[rl_command.index("--init-policy") + 1] == str(run / "bc" / "guidance.safetensors")
    assert "--seed" in rl_command and "3" in rl_command
    updates = len([r for r in read_metrics(run / "rl") if "losses/loss" in r])
    printed = capsys.readouterr().out
    assert "stage 1/3 (collect_data.py): running" in printed and "stage 3/3 (train_reward_gradient.py): done" in printed

    # Stopped before the last stage finished (its marker is not written until it does): the rerun skips the
    # finished stages and resumes that one from its own folder, which adds no update to a finished run.
    (run / "rl" / STAGE_DONE).unlink()
    run_algorithm("reward-gradient-distilled", run, budget="smoke", args=args)
    printed = capsys.readouterr().out
    assert "stage 1/3 (collect_data.py): done before" in printed and "stage 2/3 (train_bc.py): done before" in printed
    assert "stage 3/3 (train_reward_gradient.py): running" in printed
    assert len([r for r in read_metrics(run / "rl") if "losses/loss" in r]) == updates
    # other options are another command: the stage runs again (and resumes or refuses as its script decides)
    run_algorithm("reward-gradient-distilled", run, budget="smoke", args=args, progress=False)
    assert capsys.readouterr().out.count("skipped") == 0  # progress off: nothing printed


def test_a_stage_that_refuses_its_options_stops_the_chain_with_its_reason(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"stage 1/3 \(collect_data.py\): --threads 0: must be a positive integer"):
        run_algorithm("reward-gradient-distilled", tmp_path / "chain", budget="smoke",
                      args=["--wandb-mode", "disabled", "--threads", "0"])
    assert not (tmp_path / "chain" / "data" / STAGE_DONE).exists()


def test_the_few_step_chain_trains_a_policy_that_is_evaluated_at_its_own_steps(tmp_path) -> None:
    """The few-step recipe (fluxguide/algos/few_step.py) at the smoke budget: CFG's coarse displacements, their
    distillation and the reward-gradient fine-tuning at the coarse steps; evaluate.py then samples each policy at the
    steps its run recorded (the fine-tuning's --num-steps, the distillation's dataset's)."""
    from fluxguide.data.store import GuidanceDataset
    from tests.scripts import ROOT, load_script

    run = tmp_path / "few"
    policy_dir = run_algorithm("reward-gradient-4-step", run, budget="smoke", args=["--wandb-mode", "disabled"],
                               progress=False)
    meta = GuidanceDataset(run / "data").metadata
    assert (meta["num_steps"], meta["collected_steps"], meta["coarse_steps"]) == (2, 4, 2)
    evaluate = load_script(ROOT / "experiments" / "evaluate.py")
    rows = evaluate.main(evaluate.Config(policies=(policy_dir, run / "bc"), names=("rl", "bc"), best_of=(),
                                         num_prompts=1, samples_per_prompt=1, grid_prompts=1,
                                         out_dir=tmp_path / "eval"))
    steps = {r["sampler"]: (r["num_steps"], r["model_calls_per_image"]) for r in rows}
    assert steps == {"base": (20, 20), "CFG 3": (20, 40), "rl": (2, 2), "bc": (2, 2)}
