"""experiments/reward_study.py: one command trains one algorithm per reward and scores every policy with every
reward (issue 31); its smoke budget here."""

from __future__ import annotations

import csv
import json

import pytest

from fluxguide.harness.config import ConfigError
from tests.scripts import load_script

study = load_script("reward_study")


def test_the_smoke_study_trains_each_reward_with_its_algorithm_and_writes_the_matrix(tmp_path) -> None:
    out = tmp_path / "study"
    rows = study.main(study.Config(out_dir=out, budget="smoke", rewards=("shapes-clip", "verifier-partial"),
                                   seeds=(0,), eval_num_prompts=2, eval_samples_per_prompt=1, wandb_mode="offline"))
    # reward gradient for the differentiable reward, the black-box algorithm (PPO) for the verifier
    logs = {r: (out / "runs" / r / "seed0" / "log.txt").read_text() for r in ("shapes-clip", "verifier-partial")}
    assert "train_reward_gradient.py" in logs["shapes-clip"] and "--reward-target None" in logs["shapes-clip"]
    assert "train_ppo.py" in logs["verifier-partial"] and "--wandb-group reward-study" in logs["verifier-partial"]
    # base sampler, CFG, then one row per trained reward; every cell scored by every reward and the verifier
    assert [r["trained on"] for r in rows] == ["base sampler", "CFG 3", "shapes-clip", "verifier-partial"]
    for row in rows[1:]:
        for column in ("shapes-clip", "verifier-partial", study.VERIFIER):
            assert row[f"{column} lo"] <= row[f"{column} gain"] <= row[f"{column} hi"]
    text = (out / "matrix.md").read_text()
    assert "| shapes-clip (reward-gradient) |" in text and "| verifier-partial (ppo) |" in text
    assert "| reward | algorithm | verdict (held-out matrix) | runs flagged during training |" in text
    with (out / "matrix.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    for name in ("curves.png", "samples.png", "wandb_report.md", "wandb_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "wandb_report.json").read_text())
    assert "shapes-clip" in json.dumps(report) and "eval/rewards/" in json.dumps(report)
    assert list((out / "wandb_study" / "wandb").glob("offline-run-*"))


def row(trained: str, **cells: tuple[float, float, float]) -> dict:
    out = {"trained on": trained}
    for column, (gain, lo, hi) in cells.items():
        column = study.VERIFIER if column == "verifier" else column.replace("_", "-")
        out |= {f"{column} gain": gain, f"{column} lo": lo, f"{column} hi": hi}
    return out


def test_the_verdict_reads_the_intervals() -> None:
    cfg = study.Config(rewards=("brightness", "shapes-clip", "shapes-aesthetic"))
    flat = (0.0, -0.1, 0.1)
    hacked = row("brightness", brightness=(0.3, 0.2, 0.4), shapes_clip=(-0.4, -0.5, -0.3), shapes_aesthetic=flat,
                 verifier=(-0.3, -0.4, -0.2))
    assert study.verdict(cfg, hacked) == "**hacked**: its own score rose while the held-out verifier, shapes-clip fell"
    most_others_fell = row("brightness", brightness=(0.3, 0.2, 0.4), shapes_clip=(-0.4, -0.5, -0.3),
                           shapes_aesthetic=(-0.1, -0.2, -0.05), verifier=flat)
    assert study.verdict(cfg, most_others_fell).startswith("**hacked**: its own score rose while shapes-clip, shape")
    honest = row("shapes-clip", brightness=(-0.01, -0.02, -0.005), shapes_clip=(0.1, 0.05, 0.15),
                 shapes_aesthetic=flat, verifier=(0.2, 0.1, 0.3))
    assert study.verdict(cfg, honest) == "improves the verifier (trade-off: brightness -0.01 fell)"
    alone = row("shapes-clip", brightness=flat, shapes_clip=(0.1, 0.05, 0.15), shapes_aesthetic=flat, verifier=flat)
    assert study.verdict(cfg, alone) == "raises its own score; the verifier did not move beyond its interval"
    nothing = row("shapes-clip", brightness=flat, shapes_clip=flat, shapes_aesthetic=flat, verifier=flat)
    assert study.verdict(cfg, nothing) == "no change beyond the intervals"


def test_a_pipeline_algorithm_or_an_unknown_reward_is_refused_before_training(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--differentiable-algorithm bc: the study trains each reward with a one-s"):
        study.main(study.Config(out_dir=tmp_path, differentiable_algorithm="bc"))
    with pytest.raises(Exception, match="no-such-reward"):
        study.main(study.Config(out_dir=tmp_path, rewards=("no-such-reward",), budget="smoke"))
    assert not (tmp_path / "runs").exists()
