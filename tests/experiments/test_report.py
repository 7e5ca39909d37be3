"""experiments/report.py: the results report over seeds, on two tiny training runs and on made-up curves."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
import tyro

from fluxguide.harness.config import ConfigError
from fluxguide.harness.tracking import metric_curve, read_metrics
from tests.scripts import load_script

report = load_script("report")

#: Two updates on the pretrained shapes world (so the verifier passes some images), evaluated after each.
TINY = ["--backbone", "shapes", "--batch-size", "2", "--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2",
        "--num-layers", "1", "--eval-num-prompts", "4", "--eval-samples-per-prompt", "1", "--grid-prompts", "2",
        "--wandb-mode", "disabled", "--total-updates", "2", "--eval-every", "1", "--checkpoint-every", "2",
        "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """compare.py's layout: <out>/runs/reward-gradient/seed{0,1} and an evaluation.csv in <out>."""
    train = load_script("train_reward_gradient")
    out = tmp_path_factory.mktemp("compare")
    for seed in (0, 1):
        run_dir = out / "runs" / "reward-gradient" / f"seed{seed}"
        train.main(tyro.cli(train.Config, args=[*TINY, "--seed", str(seed), "--run-dir", str(run_dir)]))
    with (out / "evaluation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sampler", "model_calls_per_image", "seconds_per_image",
                                               "verifier_pass_rate", "pass_rate_lo", "pass_rate_hi", "gain_vs_base",
                                               "gain_lo", "gain_hi", "images"])
        writer.writeheader()
        writer.writerow({"sampler": "base", "model_calls_per_image": 20, "seconds_per_image": 0.01,
                         "verifier_pass_rate": 0.25, "pass_rate_lo": 0.0, "pass_rate_hi": 0.5})
        writer.writerow({"sampler": "reward-gradient", "model_calls_per_image": 20, "seconds_per_image": 0.02,
                         "verifier_pass_rate": 0.5, "pass_rate_lo": 0.25, "pass_rate_hi": 0.75, "gain_vs_base": 0.25,
                         "gain_lo": 0.05, "gain_hi": 0.45, "images": 360})
    return out


def test_report_on_two_tiny_runs_has_one_row_with_their_numbers(runs: Path, capsys) -> None:
    out = runs / "report.md"
    rows = report.main(report.Config(runs=(str(runs / "runs" / "*" / "seed*"),), out=out, reward_window=1))
    assert len(rows) == 1
    row = rows[0]
    assert row["algorithm"] == "reward-gradient" and row["seeds"] == 2 and row["seed_list"] == [0, 1]
    metrics = [read_metrics(runs / "runs" / "reward-gradient" / f"seed{s}") for s in (0, 1)]
    finals = [metric_curve(m, "eval/verifier_pass_rate")[1][-1] for m in metrics]
    rewards = [metric_curve(m, "train/reward_mean")[1] for m in metrics]
    assert row["final_pass_rate"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert (row["final_pass_rate"]["min"], row["final_pass_rate"]["max"]) == (min(finals), max(finals))
    assert row["equal_samples"] == 4  # batch 2 x 2 updates, reached by both seeds
    assert row["pass_at_equal_samples"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert row["final_train_reward"]["mean"] == pytest.approx(statistics.fmean(r[-1] for r in rewards))
    assert row["train_reward_change"]["mean"] == pytest.approx(statistics.fmean(r[-1] - r[0] for r in rewards))
    assert row["model_calls_per_image"] == 20 and row["seconds_per_image"] == pytest.approx(0.02)
    assert "pass_at_equal_time" in row

    text = out.read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| reward-gradient |")
                  and "above base" not in line]
    assert len(table_rows) == 1 and table_rows[0].startswith(f"| reward-gradient | 2 | {statistics.fmean(finals):.3f} |")
    assert "python experiments/report.py --runs" in text and "--reward-window 1" in text  # the command that made it
    assert "| base | 0.250 | [0.000, 0.500] |" in text  # the reference samplers of the evaluation table
    # the comparison table's numbers (noise no training saw), each seed's gain with its interval, and a verdict
    assert row["fresh_gain"]["mean"] == pytest.approx(0.25)
    fresh = [line for line in text.splitlines() if line.startswith("| reward-gradient |") and "above base" in line]
    assert len(fresh) == 1 and "seed 0: +25.0 [+5.0, +45.0]" in fresh[0] and "above base on all 2 seeds" in fresh[0]
    assert text in capsys.readouterr().out


def test_report_says_when_seeds_disagree_and_when_the_reward_is_hacked() -> None:
    def run(seed: int, passes: list[float], rewards: list[float]):
        return report.RunSummary(path=Path(f"runs/ppo/seed{seed}"), algorithm="ppo", seed=seed, samples=[0, 50, 100],
                                 wall=[0.0, 30.0, 60.0 + 60 * seed], pass_rates=passes, wall_pass_rates=passes,
                                 rewards=rewards, cost={})

    runs = [run(0, [0.4, 0.3, 0.2], [0.1, 0.5]), run(1, [0.4, 0.4, 0.6], [0.1, 0.7])]
    cfg = report.Config(runs=("runs/ppo/*",))
    rows = report.summarize(runs, cfg)
    assert rows[0]["seeds_disagree"] and rows[0]["equal_seconds"] == 60.0
    # at 60 s seed 0 has ended (0.2); seed 1 is a third of the way from 30 s (0.4) to 120 s (0.6)
    assert rows[0]["pass_at_equal_time"]["max"] == pytest.approx(0.4 + 0.2 * 30 / 90)
    text = report.markdown(rows, runs, cfg)
    assert "ppo: the seeds disagree: final pass rates 0.200–0.600" in text
    assert "reward hacking" not in text  # the mean pass rate did not fall (0.4 -> 0.4)
    runs[1] = run(1, [0.4, 0.3, 0.3], [0.1, 0.7])
    assert "reward hacking" in report.markdown(report.summarize(runs, cfg), runs, cfg)


def test_report_refuses_globs_without_runs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="matches no run folder"):
        report.main(report.Config(runs=(str(tmp_path / "nothing*"),), out=tmp_path / "r.md"))
