"""A results report over seeds, generated from run folders (nothing typed by hand).

    python experiments/report.py 'outputs/compare/runs/*/seed*'                # compare.py's runs
    python experiments/report.py 'runs/ppo/*' 'runs/reward_gradient/*' --out docs/results_report.md

Each glob names run folders (a folder whose ``metrics.jsonl`` files sit one level down, in its stages' folders, as in
compare.py's BC and chain runs, stands for those). A run's algorithm is its W&B group (``--wandb-group``, read from the config in its latest checkpoint), else
the name of the folder above it. Per algorithm the markdown table has the number of seeds; the final held-out
verifier pass rate's mean, standard deviation and min-max over seeds; the pass rate at equal samples (the largest
sample count every run of the group reached) and at equal wall time (the longest time every run reached),
interpolated on each run's evaluations; the final training reward next to the verifier and the change of both
since the start (a training reward that rises while the verifier falls is reward hacking); and the base-model
calls and seconds per image where an ``evaluation.csv`` (evaluate.py / compare.py) sits in the run folder or
above it. Below the table: where seeds disagree (final pass rates further apart than ``--disagreement``), where
the verifier fell while the reward rose, each run whose trained reward rose on the held-out images while the
verifier or a reward it was not trained on fell (``eval/rewards/<name>``, beyond two standard errors:
:func:`fluxguide.harness.monitoring.hacking_signs`), and the reference samplers of those ``evaluation.csv`` files.
Samples are each run's own count (behaviour cloning's are training pairs; its data collection is not counted) and
wall time each run's own clock.
"""

from __future__ import annotations

import csv
import glob
import math
import shlex
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from fluxguide.checkpointing import latest_checkpoint, read_manifest
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_float, check_int, validate
from fluxguide.harness.monitoring import Z_SCORE, HackingSigns, hacking_signs
from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.serialization import open_for_writing

PASS = "eval/verifier_pass_rate"
WALL = "perf/wall_seconds"
REWARD = "train/reward_mean"


@dataclass
class Config:
    runs: tuple[str, ...] = ("outputs/compare/runs/*/seed*",)
    """run-folder globs (quote them), e.g. 'outputs/compare/runs/*/seed*' or 'runs/ppo/*'"""
    out: Path = Path("outputs/report.md")
    """where the markdown report is written (e.g. docs/results_report.md); it is printed too"""
    disagreement: float = 0.10
    """seeds whose final pass rates lie further apart than this (0.10 = 10 points) are reported as disagreeing"""
    reward_window: int = 10
    """the final (and first) training reward is the mean of this many updates' reward"""
    equal_budget: Literal["group", "all"] = "group"
    """the budget of the equal-samples / equal-time columns: what every run of the algorithm reached ('group'),
    or what every run in the report reached ('all': one budget for all algorithms)"""

    def validate(self) -> None:
        """Refuse bad values before any file is read (:class:`ConfigError` naming the flag)."""
        if not self.runs:
            raise ConfigError("--runs needs at least one run-folder glob")
        check_float("disagreement", self.disagreement, minimum=0.0)
        check_int("reward_window", self.reward_window)


@dataclass
class RunSummary:
    """What the report reads from one run folder."""

    path: Path
    algorithm: str
    seed: int | None
    samples: list[float]  # at each held-out evaluation
    wall: list[float]  # seconds, at each held-out evaluation that has them
    pass_rates: list[float]
    wall_pass_rates: list[float]
    rewards: list[float]  # training reward per update
    cost: dict[str, str]  # evaluation.csv's row for this algorithm, if any
    signs: HackingSigns | None = None  # first -> last held-out evaluation: what rose and fell (reward hacking)


def find_runs(patterns: tuple[str, ...]) -> list[Path]:
    """The run folders the globs match, in order, each once; a match without a ``metrics.jsonl`` stands for the
    stage folders below it that have one (a multi-stage run of compare.py: BC's ``train/``, the chain's ``bc/`` and
    ``rl/``)."""
    runs: dict[Path, None] = {}
    for pattern in patterns:
        for match in sorted(glob.glob(pattern, recursive=True)):
            path = Path(match)
            if (path / "metrics.jsonl").is_file():
                runs[path] = None
            elif path.is_dir():
                runs.update(dict.fromkeys(sorted(sub for sub in path.iterdir() if (sub / "metrics.jsonl").is_file())))
    return list(runs)


def run_config(path: Path) -> dict[str, Any]:
    """The flat config in the run's latest checkpoint (``{}`` without one)."""
    ckpt = latest_checkpoint(path)
    return read_manifest(ckpt).get("state", {}).get("config", {}) if ckpt is not None else {}


def evaluation_row(path: Path, algorithm: str) -> tuple[dict[str, str], Path | None]:
    """The row of ``algorithm`` in the nearest ``evaluation.csv`` in ``path`` or up to four folders above it."""
    for folder in [path, *path.parents][:5]:
        table = folder / "evaluation.csv"
        if table.is_file():
            with table.open(newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("sampler") == algorithm:
                        return row, table
    return {}, None


def read_run(path: Path) -> RunSummary:
    config = run_config(path)
    group = config.get("wandb_group")
    algorithm = group if group and group != "fluxguide" else (path.parent.parent.name if path.name == "train"
                                                              else path.parent.name)
    records = read_metrics(path)
    samples, pass_rates = metric_curve(records, PASS)
    timed = [(r[WALL], r[PASS]) for r in records if PASS in r and WALL in r]
    evals = [r for r in records if PASS in r]
    return RunSummary(path=path, algorithm=algorithm, seed=config.get("seed"), samples=samples,
                      wall=[w for w, _ in timed], pass_rates=pass_rates, wall_pass_rates=[p for _, p in timed],
                      rewards=metric_curve(records, REWARD)[1], cost=evaluation_row(path, algorithm)[0],
                      signs=hacking_signs(evals[0], evals[-1], config.get("reward")) if len(evals) > 1 else None)


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """``ys`` at ``x``, linear between the points (``xs`` increasing; clamped at the ends)."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def reward_ends(rewards: list[float], window: int) -> tuple[float, float]:
    """The mean training reward of the first and of the last ``window`` updates (of each half of a shorter run)."""
    k = max(1, min(window, len(rewards) // 2))
    return statistics.fmean(rewards[:k]), statistics.fmean(rewards[-k:])


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (NaN for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "min": min(values), "max": max(values)}


def summarize(runs: list[RunSummary], cfg: Config) -> list[dict[str, Any]]:
    """One dict of numbers per algorithm (the table's rows), in the order the algorithms first appear."""
    runs = [r for r in runs if r.pass_rates]
    budget_runs = {a: [r for r in runs if r.algorithm == a] if cfg.equal_budget == "group" else runs
                   for a in dict.fromkeys(r.algorithm for r in runs)}
    rows = []
    for algorithm, scope in budget_runs.items():
        group = [r for r in runs if r.algorithm == algorithm]
        final = spread([r.pass_rates[-1] for r in group])
        samples = min(r.samples[-1] for r in scope)
        row = {"algorithm": algorithm, "seeds": len(group), "seed_list": [r.seed for r in group],
               "final_pass_rate": final, "equal_samples": samples,
               "pass_at_equal_samples": spread([interpolate(r.samples, r.pass_rates, samples) for r in group])}
        if all(r.wall for r in scope):
            seconds = min(r.wall[-1] for r in scope)
            row["equal_seconds"] = seconds
            row["pass_at_equal_time"] = spread([interpolate(r.wall, r.wall_pass_rates, seconds) for r in group])
        rewarded = [r for r in group if r.rewards]
        if rewarded:
            row["final_train_reward"] = spread([reward_ends(r.rewards, cfg.reward_window)[1] for r in rewarded])
            row["train_reward_change"] = spread([reward_ends(r.rewards, cfg.reward_window)[1]
                                                 - reward_ends(r.rewards, cfg.reward_window)[0] for r in rewarded])
        row["pass_rate_change"] = spread([r.pass_rates[-1] - r.pass_rates[0] for r in group])
        for key in ("model_calls_per_image", "seconds_per_image"):
            values = [float(r.cost[key]) for r in group if r.cost.get(key)]
            if values:
                row[key] = statistics.fmean(values)
        fresh = [r for r in group if all(r.cost.get(k) for k in ("gain_vs_base", "gain_lo", "gain_hi", "images"))]
        if fresh:  # compare.py / evaluate.py tables: many images, noise no training run saw, paired intervals
            row["fresh"] = [(r.seed, float(r.cost["verifier_pass_rate"]), float(r.cost["gain_vs_base"]),
                             float(r.cost["gain_lo"]), float(r.cost["gain_hi"]), int(float(r.cost["images"])))
                            for r in fresh]
            row["fresh_pass_rate"] = spread([f[1] for f in row["fresh"]])
            row["fresh_gain"] = spread([f[2] for f in row["fresh"]])
        row["seeds_disagree"] = final["max"] - final["min"] > cfg.disagreement
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _range(s: dict[str, float]) -> str:
    return f"{_fmt(s['min'])}–{_fmt(s['max'])}"


COLUMNS = ("algorithm", "seeds", "final pass rate (mean)", "std", "min–max", "pass @ equal samples",
           "pass @ equal wall time", "final train reward", "Δ train reward", "Δ pass rate", "model calls / image",
           "s / image")


def markdown(rows: list[dict[str, Any]], runs: list[RunSummary], cfg: Config) -> str:
    """The report: the command, the table and its notes."""
    flags = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in fields(cfg)
             if f.name not in ("runs", "out") and getattr(cfg, f.name) != f.default]
    command = " ".join(["python experiments/report.py --runs", *map(shlex.quote, cfg.runs), "--out", str(cfg.out),
                        *flags])
    lines = [f"Generated by `{command}` from {len(runs)} run folders.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        final, at_samples = row["final_pass_rate"], row["pass_at_equal_samples"]
        at_time = row.get("pass_at_equal_time")
        reward, change = row.get("final_train_reward"), row.get("train_reward_change")
        cells = [row["algorithm"], str(row["seeds"]), _fmt(final["mean"]), _fmt(final["std"]), _range(final),
                 f"{_fmt(at_samples['mean'])} ({_range(at_samples)}) @ {row['equal_samples']:g}",
                 f"{_fmt(at_time['mean'])} ({_range(at_time)}) @ {_duration(row['equal_seconds'])}" if at_time
                 else "–",
                 _fmt(reward["mean"], 4) if reward else "–", f"{change['mean']:+.4f}" if change else "–",
                 f"{row['pass_rate_change']['mean']:+.3f}", _fmt(row.get("model_calls_per_image"), 0),
                 _fmt(row.get("seconds_per_image"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for row in rows:
        final = row["final_pass_rate"]
        if row["seeds_disagree"]:
            notes.append(f"- {row['algorithm']}: the seeds disagree: final pass rates {_range(final)} "
                         f"(seeds {row['seed_list']}), further apart than {100 * cfg.disagreement:g} points; "
                         "the mean hides it")
        change = row.get("train_reward_change")
        if change and change["mean"] > 0 and row["pass_rate_change"]["mean"] < -1e-9:  # beyond rounding
            notes.append(f"- {row['algorithm']}: the training reward rose ({change['mean']:+.4f}) while the held-out "
                         f"verifier fell ({row['pass_rate_change']['mean']:+.3f}): reward hacking")
        for run in (r for r in runs if r.algorithm == row["algorithm"] and r.signs is not None and r.signs.hacked):
            notes.append(f"- {run.path}: **reward hacking**: on the held-out images the {run.signs} "
                         f"(first to last evaluation, changes beyond {Z_SCORE:g} standard errors)")
        if row["seeds"] < 3:
            notes.append(f"- {row['algorithm']}: {row['seeds']} seed(s); a claim wants three")
    lines += _fresh_table(rows)
    scope = "per algorithm" if cfg.equal_budget == "group" else "one for all algorithms"
    lines += ["", (f"Pass rates are the held-out verifier's (in the first table, each run's own evaluations); Δ is final minus the first evaluation (pass rate) or "
                   f"the first {cfg.reward_window} updates (reward); equal budgets: {scope}.")]
    if notes:
        lines += ["", *notes]
    lines += _references(runs)
    return "\n".join(lines) + "\n"


def _fresh_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per algorithm, the comparison tables' numbers for each seed's policy: pass rate and gain over the base
    sampler with its paired-bootstrap 90% interval, on the tables' own noise (which no training run saw)."""
    rows = [r for r in rows if r.get("fresh")]
    if not rows:
        return []
    lines = ["", ("On the comparison tables' evaluation noise (`evaluation.csv` next to the runs; no training or "
                  "model-selection step saw it):"), "",
             ("| algorithm | seeds | pass rate (mean) | min–max | gain vs base (mean) | each seed: gain [90% interval] "
              "| images per seed | verdict |"), "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fresh = row["fresh"]
        each = "; ".join(f"seed {seed}: {100 * g:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                         for seed, _, g, lo, hi, _ in fresh)
        above = sum(lo > 0 for *_, lo, _, _ in fresh)
        verdict = (f"above base on all {len(fresh)} seeds" if above == len(fresh)
                   else f"above base on {above} of {len(fresh)} seeds")
        images = sorted({n for *_, n in fresh})
        lines.append(f"| {row['algorithm']} | {len(fresh)} | {_fmt(row['fresh_pass_rate']['mean'])} | "
                     f"{_range(row['fresh_pass_rate'])} | {100 * row['fresh_gain']['mean']:+.1f} points | {each} | "
                     f"{', '.join(map(str, images))} | {verdict} |")
    return lines


def _references(runs: list[RunSummary]) -> list[str]:
    """The base sampler, CFG and best-of-N rows of the evaluation tables next to the runs."""
    algorithms = {r.algorithm for r in runs}
    tables = dict.fromkeys(t for r in runs if (t := evaluation_row(r.path, r.algorithm)[1]) is not None)
    lines = []
    for table in tables:
        with table.open(newline="") as f:
            refs = [row for row in csv.DictReader(f) if row["sampler"] not in algorithms]
        if not refs:
            continue
        lines += ["", f"Reference samplers ({table}, one seed):", "",
                  "| sampler | pass rate | 90% interval | gain vs base | model calls / image | s / image |",
                  "|---|---|---|---|---|---|"]
        for row in refs:
            interval = f"[{float(row['pass_rate_lo']):.3f}, {float(row['pass_rate_hi']):.3f}]" \
                if row.get("pass_rate_lo") else "–"
            gain = f"{float(row['gain_vs_base']):+.3f}" if row.get("gain_vs_base") else "–"
            lines.append(f"| {row['sampler']} | {float(row['verifier_pass_rate']):.3f} | {interval} | {gain} | "
                         f"{row['model_calls_per_image']} | {float(row['seconds_per_image']):.4f} |")
    return lines


def main(cfg: Config) -> list[dict[str, Any]]:
    validate(cfg)
    paths = find_runs(cfg.runs)
    if not paths:
        raise ConfigError(f"--runs {' '.join(cfg.runs)} matches no run folder (a folder with a metrics.jsonl)")
    runs = [read_run(p) for p in paths]
    rows = summarize(runs, cfg)
    if not rows:
        raise ConfigError(f"no run under --runs {' '.join(cfg.runs)} has a held-out evaluation ({PASS})")
    text = markdown(rows, runs, cfg)
    with open_for_writing(cfg.out) as f:  # never through a link
        f.write(text)
    print(text)
    print(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    cli(main, Config)
