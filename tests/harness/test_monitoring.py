"""Reward-hacking diagnostics: untrained rewards at every evaluation, and the report's flag (issue 31)."""

from __future__ import annotations

import pytest
import torch

from fluxguide.backbones.registry import build_backbone
from fluxguide.harness.monitoring import (
    RewardMonitor,
    hacking_signs,
    monitored_names,
    reward_metrics,
)
from fluxguide.harness.tracking import read_metrics
from fluxguide.rewards import make_reward
from tests.scripts import ROOT, load_script, run_script


def record(pass_rate: float, images: int = 64, **rewards: tuple[float, float]) -> dict[str, float]:
    """An evaluation record: the verifier's pass rate and ``name=(mean, stderr)`` per reward."""
    out = {"eval/verifier_pass_rate": pass_rate, "eval/images": images}
    for name, (mean, stderr) in rewards.items():
        out |= {f"eval/rewards/{name}": mean, f"eval/rewards_stderr/{name}": stderr}
    return out


def test_reward_metrics_are_the_mean_and_its_standard_error() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    metrics = reward_metrics("r", values)
    assert metrics["eval/rewards/r"] == pytest.approx(3.0)
    assert metrics["eval/rewards_stderr/r"] == pytest.approx(float(values.std()) / 2)


def test_a_rise_of_the_trained_reward_with_a_fall_elsewhere_is_hacking() -> None:
    first = record(0.40, brightness=(0.05, 0.01), clip=(0.80, 0.01), aesthetic=(0.85, 0.01))
    last = record(0.00, brightness=(0.45, 0.01), clip=(0.30, 0.02), aesthetic=(0.86, 0.01))
    signs = hacking_signs(first, last, "brightness")
    assert signs.hacked
    assert {c.name for c in signs.fell} == {"held-out verifier", "clip"}  # the aesthetic's +0.01 is noise
    assert "trained brightness +0.4" in str(signs) and "clip -0.5" in str(signs)


def test_an_honest_improvement_and_changes_within_noise_are_not_hacking() -> None:
    first = record(0.40, retrieval=(-1.0, 0.1), clip=(0.80, 0.01), aesthetic=(0.85, 0.01))
    better = record(0.70, retrieval=(-0.2, 0.1), clip=(0.83, 0.01), aesthetic=(0.84, 0.01))  # aesthetic: -1 s.e.
    signs = hacking_signs(first, better, "retrieval")
    assert signs.trained.rose and not signs.fell and not signs.hacked
    assert {c.name for c in signs.rose} == {"held-out verifier", "clip"}
    # a reward that fell while the trained one did not rise is a failed run, not a hacked one
    flat = record(0.40, retrieval=(-1.05, 0.1), clip=(0.60, 0.01))
    assert not hacking_signs(first, flat, "retrieval").hacked
    # a pass-rate fall within the binomial error of 64 images is not a fall
    assert not hacking_signs(record(0.40), record(0.35), None).fell


def test_the_monitor_leaves_the_trained_reward_out_and_scores_the_others() -> None:
    world = build_backbone("shapes-random", num_steps=2)
    assert world.monitor_rewards() == ("shapes-clip", "shapes-clip-retrieval", "shapes-aesthetic", "verifier-partial")
    monitor = RewardMonitor.build(world, None, trained="shapes-clip", batch_size=3)
    assert monitor.names == ["shapes-clip-retrieval", "shapes-aesthetic", "verifier-partial"]
    images, prompts = torch.rand(5, 3, world.image_height, world.image_width), ["a red circle"] * 5
    metrics = monitor(images, prompts)
    assert sorted(monitored_names(metrics)) == sorted(monitor.names)
    expected = make_reward("verifier-partial", verify=world.verifier)(images, prompts).mean()
    assert metrics["eval/rewards/verifier-partial"] == pytest.approx(float(expected))  # batches of 3 joined right
    assert RewardMonitor.build(world, ["brightness"], trained=None).names == ["brightness"]
    assert build_backbone("tiny-flux").monitor_rewards() == ()  # an open world names none by default


def test_a_run_trained_on_a_hackable_reward_is_flagged_by_the_report(tmp_path) -> None:
    """Mean brightness is raised by whitening the image: the policy gets brighter and worse, and report.py says
    so from the untrained rewards and the verifier each evaluation logged."""
    script = load_script("train_reward_gradient")
    run_dir = tmp_path / "runs" / "brightness"
    run_script(script, ["--run-dir", str(run_dir), "--reward", "brightness", "--reward-target", "1.0",
                        "--num-steps", "6", "--batch-size", "4", "--lr", "0.1", "--total-updates", "6",
                        "--eval-every", "6", "--eval-num-prompts", "8", "--grid-prompts", "2",
                        "--wandb-mode", "disabled"])
    evals = [r for r in read_metrics(run_dir) if "eval/verifier_pass_rate" in r]
    assert len(evals) == 2
    assert set(monitored_names(evals[-1])) == {"brightness", "shapes-clip", "shapes-clip-retrieval",
                                               "shapes-aesthetic", "verifier-partial"}
    assert hacking_signs(evals[0], evals[-1], "brightness").hacked
    report = load_script(ROOT / "experiments" / "report.py")
    out = tmp_path / "report.md"
    report.main(report.Config(runs=(str(run_dir),), out=out))
    text = out.read_text()
    assert f"- {run_dir}: **reward hacking**: on the held-out images the trained brightness +" in text
    assert "fell: " in text
