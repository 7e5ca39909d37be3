"""The data-collection and behaviour-cloning scripts end to end, on a randomly initialised shapes world.

A collection killed mid-way (SIGKILL on a real subprocess) and rerun ends with exactly the dataset of an
uninterrupted run; every target strategy runs from the command line; training logs the held-out verifier
against the base / CFG references, resumes from its checkpoint and saves a loadable policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fluxguide.data.episodes import EPISODE
from fluxguide.data.store import DatasetError, GuidanceDataset, load_guidance_dataset
from fluxguide.checkpointing import latest_checkpoint
from fluxguide.policies import AttentionGuidanceModel, load_guidance_model
from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.experiments import kill_when
from tests.scripts import ROOT, load_script, run_script

collect_data = load_script("collect_data")
train_bc = load_script("train_bc")

SMALL_COLLECT = ["--backbone", "shapes-random", "--num-steps", "3", "--wandb-mode", "disabled", "--prompt-swaps", "0"]
SMALL_TRAIN = [
    "--backbone", "shapes-random", "--batch-size", "16", "--hidden-dim", "16", "--num-heads", "2", "--num-layers",
    "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode",
    "disabled", "--warmup-updates", "2",
]


def collect(argv: list[str]) -> GuidanceDataset:
    return run_script(collect_data, SMALL_COLLECT + argv)


def train_small(argv: list[str]) -> dict[str, float]:
    return run_script(train_bc, SMALL_TRAIN + argv)


def test_killed_collection_reruns_to_the_uninterrupted_dataset(tmp_path: Path) -> None:
    common = ["--episodes", "12", "--batch-size", "2"]
    reference = collect(common + ["--out-dir", str(tmp_path / "reference")])
    assert reference.num_chunks == 6 and reference.num_episodes == 12

    out = tmp_path / "killed"
    argv = [sys.executable, str(ROOT / "experiments" / "collect_data.py"), *SMALL_COLLECT, *common,
            "--out-dir", str(out)]
    # killed while appending the second chunk or soon after
    kill_when(argv, lambda: (out / "chunk-000001").exists(), interval=0.005)
    partial = load_guidance_dataset(out)  # a chunk killed mid-append is ignored, so 1 or more are on disk
    assert 1 <= partial.num_chunks < 6, f"not killed mid-way: {partial.num_chunks} chunks on disk"

    resumed = collect(common + ["--out-dir", str(out)])
    assert resumed.num_chunks == 6 and resumed.prompts == reference.prompts
    got, want = resumed.transitions(), reference.transitions()
    assert torch.equal(got[EPISODE], want[EPISODE])
    for key in ("img", "pred", "target", "txt"):
        assert torch.allclose(got[key], want[key], atol=1e-6), key


@pytest.mark.parametrize("argv", [
    ["--strategy", "best-of-n", "--n", "3", "--top-k", "2", "--reward", "verifier-attributes"],
    ["--strategy", "reference-image"],
    ["--strategy", "reward-gradient", "--reward", "shapes-clip"],
], ids=["best-of-n", "reference-image", "reward-gradient"])
def test_every_strategy_collects_from_the_command_line(tmp_path: Path, argv: list[str]) -> None:
    data = collect(argv + ["--episodes", "4", "--batch-size", "2", "--out-dir", str(tmp_path / "data")])
    per_prompt = 2 if "best-of-n" in argv else 1
    assert data.num_episodes == 4 * per_prompt and data.num_transitions == 3 * 4 * per_prompt
    assert data.metadata["strategy"] == argv[1].replace("-", "_")
    assert float(data.transitions()["target"].abs().max()) > 0


def test_prompt_swaps_from_the_command_line(tmp_path: Path) -> None:
    data = collect(["--episodes", "4", "--batch-size", "2", "--prompt-swaps", "2", "--out-dir", str(tmp_path / "d")])
    assert data.num_episodes == 4 * 3 and data.num_transitions == 3 * 4 * 3  # each trajectory under 3 prompts
    assert [m["prompt_swaps"] for m in data.chunk_metadata] == [2, 2]
    assert data.prompts[2:4] == data.prompts[:2][::-1]  # in a batch of two the only swap is the other prompt
    with pytest.raises(ValueError, match="--prompt-swaps .* needs --strategy cfg-distillation"):
        collect(["--strategy", "reference-image", "--prompt-swaps", "1", "--out-dir", str(tmp_path / "r")])


def test_training_logs_the_references_resumes_and_saves_a_loadable_policy(tmp_path: Path) -> None:
    collect(["--episodes", "8", "--batch-size", "4", "--out-dir", str(tmp_path / "data")])
    common = ["--dataset", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--eval-every", "4",
              "--checkpoint-every", "4", "--lr", "3e-3"]
    train_small(common + ["--total-updates", "8"])
    assert latest_checkpoint(tmp_path / "run").name == "step_000000008"
    train_small(common + ["--total-updates", "12"])  # resumes at update 8
    records = read_metrics(tmp_path / "run")
    xs, mse = metric_curve(records, "losses/mse")
    assert xs == [16 * i for i in range(1, 13)]  # one record per update, pairs seen continue across the resume
    assert mse[-1] < mse[0]
    _, passes = metric_curve(records, "eval/verifier_pass_rate")
    _, base = metric_curve(records, "eval/base_pass_rate")
    _, cfg = metric_curve(records, "eval/cfg_pass_rate")
    assert len(passes) == 4 and len(base) == len(cfg) == 4  # at updates 0, 4, 8 and 12
    assert all(0.0 <= p <= 1.0 for p in passes)
    policy = load_guidance_model(tmp_path / "run" / "guidance.safetensors")
    assert isinstance(policy, AttentionGuidanceModel)
    assert float(policy.out.weight.detach().abs().max()) > 0  # trained: no longer the zero-initialised output layer
    assert (tmp_path / "run" / "samples" / "eval_000000192.png").is_file()
    # A DAgger round: the trained policy drives, CFG labels; appended to the same dataset under another seed.
    # The random world follows --seed unless told otherwise: another world's states are refused...
    dagger = ["--episodes", "4", "--batch-size", "4", "--out-dir", str(tmp_path / "data"), "--seed", "1",
              "--student-checkpoint", str(tmp_path / "run" / "guidance.safetensors")]
    with pytest.raises(DatasetError, match="backbone_fingerprint"):
        collect(dagger)
    data = collect(dagger + ["--backbone-seed", "0"])  # ... the first round's world is accepted
    assert data.num_episodes == 12
    assert [m["visited_by"] for m in data.chunk_metadata] == ["teacher", "teacher", "student"]


def test_a_chain_stage_evaluates_once_at_the_end_without_references(tmp_path: Path) -> None:
    """--no-eval-at-start and --no-references (the distil-then-fine-tune chain's distillation): one evaluation, of
    the trained policy, no base / CFG rows; the collection counts its base-model calls per chunk."""
    data = collect(["--episodes", "4", "--batch-size", "4", "--out-dir", str(tmp_path / "data")])
    assert [m["model_calls"] for m in data.chunk_metadata] == [4 * 3 * 2]  # 4 trajectories, 3 steps, CFG: 2 calls
    train_small(["--dataset", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--total-updates", "4",
                 "--eval-every", "4", "--no-eval-at-start", "--no-references"])
    records = read_metrics(tmp_path / "run")
    evals = [r for r in records if "eval/verifier_pass_rate" in r]
    assert [r["charts/samples_seen"] for r in evals] == [64]
    assert not any("eval/base_pass_rate" in r or "eval/cfg_gain_recovered" in r for r in records)
    # BC runs no base model in its updates; its one evaluation does, counted as evaluation
    assert records[-1]["perf/model_calls"] == 0 and records[-1]["perf/eval_model_calls"] > 0


def test_training_on_a_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        train_small(["--dataset", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "run")])
