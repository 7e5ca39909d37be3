"""Tracking: namespaced metrics against samples seen, metrics.jsonl, offline W&B, resume truncation."""

from __future__ import annotations

import math

import pytest
import torch

from fluxguide.harness.tracking import (
    SAMPLES_SEEN,
    Tracker,
    metric_curve,
    read_metrics,
    resolve_wandb_mode,
    summarize,
)


def test_mode_resolution(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode() == "disabled"
    assert resolve_wandb_mode("online") == "online"  # an explicit choice wins
    with pytest.raises(ValueError, match="'loud'.*WANDB_MODE"):
        monkeypatch.setenv("WANDB_MODE", "loud")
        resolve_wandb_mode()


def test_offline_run_writes_wandb_files_and_jsonl(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with Tracker(tmp_path / "run", config={"lr": 1e-3}, group="test") as tracker:
        assert tracker.mode == "offline"
        tracker.log({"train/reward_mean": torch.tensor(0.25), "losses/loss_reward": -0.25}, samples_seen=16)
        tracker.log({"eval/verifier_pass_rate": 0.5, "losses/loss_reward": float("nan")}, samples_seen=32)
    records = read_metrics(tmp_path / "run")
    assert [r[SAMPLES_SEEN] for r in records] == [16, 32]
    assert records[0]["train/reward_mean"] == 0.25
    assert math.isnan(records[1]["losses/loss_reward"])
    assert metric_curve(records, "eval/verifier_pass_rate") == ([32], [0.5])
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_names_must_be_namespaced(tmp_path) -> None:
    tracker = Tracker(tmp_path, mode="disabled")
    with pytest.raises(ValueError, match="'reward'.*namespace"):
        tracker.log({"reward": 1.0}, samples_seen=1)
    with pytest.raises(ValueError, match="scalar"):
        tracker.log({"train/reward": torch.ones(2)}, samples_seen=1)


def test_resume_keeps_records_up_to_the_checkpoint_and_the_wandb_id(tmp_path) -> None:
    first = Tracker(tmp_path, mode="disabled")
    for n in (10, 20, 30):
        first.log({"train/reward_mean": n / 100}, samples_seen=n)
    first.finish()
    resumed = Tracker(tmp_path, mode="disabled", resume_samples_seen=20)
    assert resumed.wandb_id == first.wandb_id
    resumed.log({"train/reward_mean": 0.31}, samples_seen=30)
    assert metric_curve(read_metrics(tmp_path), "train/reward_mean") == ([10, 20, 30], [0.1, 0.2, 0.31])
    fresh = Tracker(tmp_path, mode="disabled")  # no resume: a new run in the same folder starts clean
    assert read_metrics(tmp_path) == [] and fresh.wandb_id != first.wandb_id


def test_torn_last_line_is_skipped(tmp_path) -> None:
    tracker = Tracker(tmp_path, mode="disabled")
    tracker.log({"train/reward_mean": 1.0}, samples_seen=4)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"charts/samples_seen": 8, "train/rew')
    assert len(read_metrics(tmp_path)) == 1


def test_summarize() -> None:
    assert summarize(torch.tensor([1.0, 3.0]), "reward") == {"reward_mean": 2.0, "reward_std": pytest.approx(math.sqrt(2))}
    assert summarize(torch.tensor([1.0]), "reward")["reward_std"] == 0.0


def test_binary_garbage_in_metrics_names_the_file_and_the_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"charts/samples_seen": 1}\n\xff\xfe\x00garbage\x9c\n{"charts/samples_seen": 2}\n')
    with pytest.raises(ValueError, match=rf"{path} line 2 is not a JSON record"):
        read_metrics(path)
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):  # resuming a run reads it too
        Tracker(tmp_path, mode="disabled", resume_samples_seen=1)
