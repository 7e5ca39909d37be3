"""Time to quality: what the distil-then-fine-tune chain costs to reach 80% held-out, against the recipe before it.

The chain (``reward-gradient-distilled``: collect CFG 3's corrections, distil them into the attention network,
fine-tune it by reward gradient) is trained the way ``compare.py`` and ``launch.run_algorithm`` train it, once
per recipe and seed, one stage after the other with one torch thread each:

- ``chain``: the registered algorithm at its ``quick`` budget (the main job's);
- ``baseline``: the three-script recipe this chain replaced (docs/results.md, "Neural guidance from a distilled
  start"), with its settings spelled out here: 512 collected trajectories, 1,500 BC updates, 160 reward-gradient
  updates of 16 images at lr 1e-2 on the caption log-probability with gradient checkpointing, evaluated every 32
  (the BC and fine-tuning stages also at their start).

For each stage and in total it prints the wall time (the stage's process, start-up included), the base-model calls
spent (``fluxguide.backbones.calls``: per image, a backward counted as two forwards; training and held-out
evaluation apart) and the held-out pass rate the stage reached (the scripts' own evaluation, 30 prompts x 4), the
samples and wall time at which the fine-tuning first reached ``--target``; then the chain's ratios to the baseline
and each total's ratio to one 20-step base episode at batch 32 timed in the same run (comparable across machines).
Results go to ``<out-dir>/time_to_quality.{md,json}``; the trained policies stay in ``<out-dir>/<recipe>/seed<k>``.

Run::

    bash run.sh bench time_to_quality                         # chain and baseline, seed 0 (about 25 min on 2 cores)
    bash run.sh bench time_to_quality --recipes chain --seeds 0 1 2    # the chain over three seeds
    bash run.sh bench time_to_quality --budget smoke          # every code path in a minute (the tests)

The 1,440-image check of the trained chains on noise no training step saw is ``experiments/evaluate.py`` on their
``rl`` folders (docs/benchmarks.md gives the command).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

from fluxguide.algos import RewardGradient, RewardGradientConfig
from fluxguide.algos.registry import EVAL, EXPERIMENTS, AlgorithmSpec, get_algorithm
from fluxguide.backbones.registry import build_backbone
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness.launch import STAGE_DONE, run_algorithm
from fluxguide.harness.tracking import read_metrics
from fluxguide.serialization import write_text_atomic

PASS = "eval/verifier_pass_rate"
CHAIN = "reward-gradient-distilled"

#: The recipe before the chain, stage by stage (collect, distil, fine-tune): its scripts' values at the time,
#: pinned here so that later changes of the defaults leave the baseline as it was.
BASELINE_ARGS: tuple[tuple[str, ...], ...] = (
    ("--episodes", "512", "--prompt-swaps", "1"),
    ("--total-updates", "1500", "--eval-every", "500", "--checkpoint-every", "500", *EVAL),
    ("--reward", "shapes-clip-retrieval", "--reward-target", "-0.1", "--lr", "1e-2", "--gradient-checkpointing",
     "--eval-at-start", "--total-updates", "160", "--eval-every", "32", "--checkpoint-every", "32", *EVAL),
)


@dataclass
class Config:
    """Which recipes, seeds and budget."""

    recipes: tuple[Literal["chain", "baseline"], ...] = ("chain", "baseline")
    """'chain' (reward-gradient-distilled at its quick budget) and/or 'baseline' (the recipe before it)"""
    seeds: tuple[int, ...] = (0,)
    """training seeds (each recipe once per seed)"""
    budget: Literal["quick", "smoke"] = "quick"
    """'quick' (the measurement) or 'smoke' (tiny networks, a few updates: the tests)"""
    target: float = 0.8
    """held-out pass rate to reach"""
    out_dir: Path = Path("outputs/time_to_quality")
    """run folders and the results"""
    weights_dir: Path | None = None
    """shapes-world weights (default: the shipped ones)"""
    wandb_mode: str = "disabled"
    """the runs' W&B mode"""
    episode_repeats: int = 3
    """timed base episodes (the best is the unit; one untimed warm-up before)"""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """options given to every stage (e.g. --eval-num-prompts 2 in a test)"""
    profile_updates: int = 3
    """fine-tuning updates timed part by part after the runs (0: no profile)"""


def baseline_spec() -> AlgorithmSpec:
    """The chain's stages with the baseline's arguments (at the smoke budget: the chain's own)."""
    chain = get_algorithm(CHAIN)
    stages = tuple(replace(stage, budgets={**stage.budgets, "quick": args})
                   for stage, args in zip(chain.stages, BASELINE_ARGS, strict=True))
    return replace(chain, name="baseline", stages=stages)


def base_episode_seconds(cfg: Config) -> float:
    """Wall seconds of one 20-step base-sampler episode at batch 32 (one thread, the best of a few)."""
    torch.set_num_threads(1)
    world = build_backbone("shapes", weights_dir=cfg.weights_dir)
    prompts = (resolve_prompts("shapes-train") * 32)[:32]
    times = []
    with torch.no_grad():
        for i in range(cfg.episode_repeats + 1):
            start = time.perf_counter()
            world.sample(prompts, num_steps=20, generator=torch.Generator().manual_seed(i))
            times.append(time.perf_counter() - start)
    return min(times[1:])


def stage_row(folder: Path, target: float) -> dict[str, float | int | None]:
    """One finished stage: wall seconds, model calls (training, evaluation), the last and first-reaching pass."""
    done = json.loads((folder / STAGE_DONE).read_text())
    records = read_metrics(folder) or read_metrics(next(folder.glob("run_seed*"), folder))  # collection: per seed
    calls = [r for r in records if "perf/model_calls" in r]
    evals = [r for r in records if PASS in r]
    reached = next((r for r in evals if r[PASS] >= target), None)
    return {"seconds": done["seconds"],
            "train_calls": int(calls[-1]["perf/model_calls"]) if calls else 0,
            "eval_calls": int(calls[-1].get("perf/eval_model_calls", 0)) if calls else 0,
            "pass_rate": evals[-1][PASS] if evals else None,
            "reached_at_samples": reached["charts/samples_seen"] if reached else None,
            "reached_at_seconds": reached.get("perf/wall_seconds") if reached else None}


def run_recipe(cfg: Config, spec: AlgorithmSpec, seed: int) -> dict:
    """Train ``spec`` for ``seed`` (finished stages are kept) and measure each stage."""
    out = cfg.out_dir / spec.name / f"seed{seed}"
    args = ["--seed", str(seed), "--threads", "1", "--wandb-mode", cfg.wandb_mode, *cfg.extra_args]
    args += ["--weights-dir", str(cfg.weights_dir)] if cfg.weights_dir else []
    run_algorithm(spec, out, budget=cfg.budget, args=args, label=f"{spec.name} seed {seed}")
    stages = {stage.folder or stage.path.stem: stage_row(out / stage.folder, cfg.target) for stage in spec.stages}
    total = {key: sum(row[key] for row in stages.values()) for key in ("seconds", "train_calls", "eval_calls")}
    last = list(stages.values())[-1]
    return {"recipe": spec.name, "seed": seed, "stages": stages,
            "total": {**total, "pass_rate": last["pass_rate"], "reached": last["reached_at_samples"] is not None}}


def table(results: list[dict], episode: float) -> list[str]:
    lines = [("| recipe | seed | stage | wall (min) | base episodes of wall | model calls, training | model calls, "
              "evaluation | held-out pass rate | first reached the target at (samples, min) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, row in [*res["stages"].items(), ("total", res["total"])]:
            passed = "" if row.get("pass_rate") is None else f"{row['pass_rate']:.1%}"
            reached = (f"{row['reached_at_samples']}, {row['reached_at_seconds'] / 60:.1f}"
                       if row.get("reached_at_samples") is not None else "")
            bold = "**" if name == "total" else ""
            lines.append(f"| {res['recipe']} | {res['seed']} | {bold}{name}{bold} | {row['seconds'] / 60:.1f} | "
                         f"{row['seconds'] / episode:.0f} | {row['train_calls']:,} | {row['eval_calls']:,} | "
                         f"{passed} | {reached} |")
    return lines


def ratios(results: list[dict]) -> list[str]:
    """The chain's totals over the baseline's, per seed both were run for."""
    by = {(r["recipe"], r["seed"]): r["total"] for r in results}
    lines = []
    for (recipe, seed), total in by.items():
        base = by.get(("baseline", seed))
        if recipe != CHAIN or base is None:
            continue
        lines.append(f"seed {seed}: chain / baseline: wall time {total['seconds'] / base['seconds']:.3f}, model calls "
                     f"in training {total['train_calls'] / base['train_calls']:.3f}, all model calls "
                     f"{all_calls(total) / all_calls(base):.3f}; held-out pass rate {total['pass_rate']:.1%} against "
                     f"{base['pass_rate']:.1%}")
    return lines


def stage_profile(folder: Path) -> dict[str, float]:
    """Where a finished stage's wall time went: its updates (or collection batches), its held-out evaluations,
    and the rest (process start-up, loading, building the models, writing files)."""
    seconds = json.loads((folder / STAGE_DONE).read_text())["seconds"]
    records = read_metrics(folder) or read_metrics(next(folder.glob("run_seed*"), folder))
    work = sum(r.get("perf/seconds_per_update", r.get("perf/seconds_per_batch", 0.0)) for r in records)
    evals, last = 0.0, 0.0
    for r in records:  # an evaluation record's wall clock minus the record before it: the evaluation's time
        if PASS in r and "perf/wall_seconds" in r:
            evals += r["perf/wall_seconds"] - last
        last = r.get("perf/wall_seconds", last)
    return {"seconds": seconds, "updates": work, "evaluation": evals, "start-up and the rest": seconds - work - evals}


def profile_update(cfg: Config, start: Path, checkpointing: bool) -> dict[str, float]:
    """Seconds of one fine-tuning update of the chain (its ``shapes-distilled`` preset from the policy ``start``),
    by part: the base model's forwards, the policy's, the reward's (global module hooks time the outermost call of
    each), and the rest (backward through all of them, optimizer step, decoding, sampler arithmetic)."""
    spec = importlib.util.spec_from_file_location("train_reward_gradient", EXPERIMENTS / "train_reward_gradient.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up by name
    spec.loader.exec_module(script)
    rg = script.shapes_distilled()
    rg.guide, rg.model = replace(rg.guide, init_policy=start), replace(rg.model, weights_dir=cfg.weights_dir)
    torch.set_num_threads(1)
    backbone = rg.model.build(seed=0, device="cpu", num_steps=rg.optim.num_steps)
    reward, policy = rg.reward.build(backbone, seed=0), rg.guide.build(backbone)
    optimizer = torch.optim.AdamW(rg.guide.param_groups(policy, rg.optim.lr), lr=rg.optim.lr)
    algo = RewardGradient(backbone, policy, reward, optimizer, RewardGradientConfig(
        num_steps=rg.optim.num_steps, gradient_checkpointing=checkpointing, reward_target=rg.reward_target,
        max_grad_norm=rg.optim.max_grad_norm, reward_shift=rg.reward_shift))
    prompts = rg.reward.prompts(backbone)[: rg.optim.batch_size]
    parts = {"base model forwards": backbone, "policy forwards": policy, "reward forwards": reward}
    spent, opened = Counter(), {}

    def before(module: torch.nn.Module, args: tuple) -> None:
        for name, part in parts.items():
            if module is part and name not in opened:
                opened[name] = time.perf_counter()

    def after(module: torch.nn.Module, args: tuple, output: object) -> None:
        for name, part in parts.items():
            if module is part and name in opened:
                spent[name] += time.perf_counter() - opened.pop(name)

    algo.update(prompts, torch.Generator().manual_seed(0))  # warm-up
    hooks = (torch.nn.modules.module.register_module_forward_pre_hook(before),
             torch.nn.modules.module.register_module_forward_hook(after))
    start_time = time.perf_counter()
    for i in range(cfg.profile_updates):
        algo.update(prompts, torch.Generator().manual_seed(i + 1))
    total = (time.perf_counter() - start_time) / cfg.profile_updates
    for hook in hooks:
        hook.remove()
    out = {name: spent[name] / cfg.profile_updates for name in parts}
    return {"update": total, **out, "backward, optimizer step and the rest": total - sum(out.values())}


def profile_lines(cfg: Config, results: list[dict]) -> list[str]:
    """The profile of the first chain run: its stages, then one fine-tuning update without and with gradient
    checkpointing (the baseline's setting)."""
    chain = next((r for r in results if r["recipe"] == CHAIN), None)
    if chain is None or cfg.profile_updates == 0:
        return []
    out = cfg.out_dir / CHAIN / f"seed{chain['seed']}"
    lines = ["| stage | wall (s) | updates / batches (s) | evaluation (s) | start-up and the rest (s) |",
             "|---|---|---|---|---|"]
    for stage in get_algorithm(CHAIN).stages:
        row = stage_profile(out / stage.folder)
        lines.append(f"| {stage.folder} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
    lines += ["", "| one fine-tuning update | seconds | share |", "|---|---|---|"]
    start = out / "bc" / "guidance.safetensors"
    row = profile_update(cfg, start, checkpointing=False)
    lines += [f"| **without gradient checkpointing (the chain's)** | **{row['update']:.2f}** | |",
              *(f"| {name} | {v:.2f} | {v / row['update']:.0%} |" for name, v in row.items() if name != "update")]
    # With checkpointing the backward reruns parts of the forwards and stops as soon as it has what it needs, so
    # the hooks cannot split it: its total only.
    ckpt = profile_update(cfg, start, checkpointing=True)["update"]
    lines.append(f"| **with gradient checkpointing** (the baseline's) | **{ckpt:.2f}** | {ckpt / row['update']:.2f}x |")
    return lines


def all_calls(total: dict) -> int:
    return total["train_calls"] + total["eval_calls"]


def main(cfg: Config) -> list[dict]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    episode = base_episode_seconds(cfg)
    print(f"one 20-step base episode at batch 32: {episode:.2f} s (one thread)")
    specs = {"chain": get_algorithm(CHAIN), "baseline": baseline_spec()}
    results = [run_recipe(cfg, specs[recipe], seed) for seed in cfg.seeds for recipe in cfg.recipes]
    lines = [(f"Time to {cfg.target:.0%} held-out (`benchmarks/time_to_quality.py`, budget {cfg.budget}); one "
              f"20-step base episode at batch 32 took {episode:.2f} s here."), "", *table(results, episode), "",
             *(f"- {line}" for line in ratios(results))]
    print("\n".join(lines), flush=True)
    profile = profile_lines(cfg, results)
    if profile:
        lines += ["", "Where the chain's time goes (its first run):", "", *profile]
        print("\n".join(lines[-len(profile) - 2:]))
    write_text_atomic("\n".join(lines) + "\n", cfg.out_dir / "time_to_quality.md")
    write_text_atomic(json.dumps({"base_episode_seconds": episode, "results": results}, indent=1),
                      cfg.out_dir / "time_to_quality.json")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
