"""The time-to-quality benchmark (issue 29) at its smoke budget: both recipes train through every stage, each
stage's wall time and base-model calls are measured, and the ratios and files come out."""

from __future__ import annotations

import json

from tests.scripts import load_script

# Smoke collection: 4 trajectories of 3 steps, each labelled by CFG (2 calls per step) under its own prompt and
# one swapped prompt (2 more).
SMOKE_COLLECTION_CALLS = 4 * 3 * (2 + 2)


def test_the_smoke_benchmark_measures_every_stage_of_the_chain(tmp_path) -> None:
    bench = load_script("time_to_quality", folder="benchmarks")
    (res,) = bench.main(bench.Config(recipes=("chain",), budget="smoke", out_dir=tmp_path, episode_repeats=1,
                                     profile_updates=1))
    assert (res["recipe"], res["seed"]) == ("reward-gradient-distilled", 0)
    data, bc, rl = (res["stages"][name] for name in ("data", "bc", "rl"))
    assert data["train_calls"] == SMOKE_COLLECTION_CALLS
    assert bc["train_calls"] == 0 and bc["eval_calls"] > 0  # distillation runs no model; its evaluation does
    assert rl["train_calls"] > 0 and rl["eval_calls"] > 0
    assert 0.0 <= rl["pass_rate"] <= 1.0 and all(row["seconds"] > 0 for row in res["stages"].values())
    assert res["total"]["train_calls"] == data["train_calls"] + rl["train_calls"]
    text = (tmp_path / "time_to_quality.md").read_text()
    assert "| **total** |" in text and f"{data['train_calls']:,}" in text
    # the profile: each stage's time split, and one fine-tuning update's, without and with checkpointing
    assert "| rl |" in text and "| base model forwards |" in text and "with gradient checkpointing" in text
    saved = json.loads((tmp_path / "time_to_quality.json").read_text())
    assert saved["base_episode_seconds"] > 0 and saved["results"] == [res]
    # the ratios line, against a baseline that spent twice as much of everything
    doubled = {**res, "recipe": "baseline", "total": {**res["total"], **{
        key: 2 * res["total"][key] for key in ("seconds", "train_calls", "eval_calls")}}}
    (line,) = bench.ratios([res, doubled])
    assert line.startswith("seed 0: chain / baseline: wall time 0.500, model calls in training 0.500, all model calls 0.500")


def test_the_baseline_recipe_parses_to_the_settings_before_the_chain(tmp_path) -> None:
    """The baseline's pinned arguments give each script the recipe the chain replaced, whatever its defaults now."""
    from fluxguide.harness.cli import cli

    bench = load_script("time_to_quality", folder="benchmarks")
    spec = bench.baseline_spec()
    configs = []
    for stage, argv in zip(spec.stages, spec.commands(tmp_path, [], "quick"), strict=True):
        script = load_script(stage.path)
        configs.append(cli(lambda cfg: cfg, script.Config, args=argv[1:], presets=getattr(script, "PRESETS", None)))
    collect, bc, rl = configs
    assert (collect.episodes, collect.prompt_swaps) == (512, 1)
    assert (bc.run.total_updates, bc.references, bc.run.eval_at_start) == (1500, True, True)
    assert (rl.reward.reward, rl.reward_target, rl.optim.lr) == ("shapes-clip-retrieval", -0.1, 1e-2)
    assert (rl.gradient_checkpointing, rl.run.eval_at_start, rl.run.total_updates) == (True, True, 160)
    assert rl.guide.head == "affine" and rl.guide.init_policy == tmp_path / "bc" / "guidance.safetensors"
    # and the chain is what the registry runs at the quick budget: the fast settings
    chain = bench.get_algorithm(bench.CHAIN)
    assert spec.stages[0].path == chain.stages[0].path and spec.commands(tmp_path, [], "quick") != chain.commands(
        tmp_path, [], "quick")
