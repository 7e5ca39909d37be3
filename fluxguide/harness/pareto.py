"""Pass rate against base-model calls: the sampler rows of a step sweep and their Pareto plot.

What a user of guidance pays for is base-model calls (a guidance network costs a fraction of a percent of one),
so samplers are compared at equal calls per image: the base sampler and CFG at 1 to 20 steps, best-of-N, and each
policy at the step count it was trained for. ``experiments/evaluate.py --pareto-steps 1 2 4 8 20`` samples every
row on the same noise (:func:`~fluxguide.harness.evaluation.compare_samplers` with per-row ``num_steps``) and draws
:func:`plot_pareto`; docs/results.md ("Few-step guidance") shows one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxguide.harness.curves import save_figure
from fluxguide.harness.evaluation import SamplerSpec


def step_label(name: str, num_steps: int) -> str:
    """The row name of a reference sampler at another step count than the table's: ``"CFG 3, 4 steps"``."""
    return f"{name}, {num_steps} step{'s' if num_steps != 1 else ''}"


def sweep_specs(steps: Sequence[int], default_steps: int, *, cfg_scale: float, best_of: Sequence[int],
                pick_reward: str) -> list[SamplerSpec]:
    """The reference rows of a step sweep, besides the table's own base / CFG / best-of-N rows at
    ``default_steps``: the base sampler and CFG at every other count of ``steps``, and best-of-N there for the N
    of ``best_of`` whose calls stay within CFG's at ``default_steps`` (the plot's range: a best-of-8 at 20 steps,
    160 calls, would say nothing about few-step sampling and cost as much as the rest of the sweep)."""
    budget = 2 * default_steps  # CFG's calls per image at the table's step count
    specs = []
    for n in sorted(set(steps) - {default_steps}):
        specs += [SamplerSpec(step_label("base", n), num_steps=n),
                  SamplerSpec(step_label(f"CFG {cfg_scale:g}", n), cfg_scale=cfg_scale, num_steps=n)]
        specs += [SamplerSpec(step_label(f"best-of-{k} ({pick_reward})", n), best_of=k, num_steps=n)
                  for k in best_of if k * n <= budget]
    return specs


def series_of(row: dict[str, Any], policies: Sequence[str]) -> str:
    """The plot series of a comparison row: a policy's own name, else its sampler family (``base``, ``CFG 3``,
    ``best-of-4``) without the step count."""
    name = str(row["sampler"])
    if name in policies:
        return name
    family = name.split(", ")[0]
    return family.split(" (")[0]  # "best-of-4 (shapes-clip)" -> "best-of-4"


def plot_pareto(rows: Sequence[dict[str, Any]], policies: Sequence[str], path: str | Path,
                title: str = "held-out pass rate against base-model calls", reference: str | None = None) -> Path:
    """Pass rate (90% interval as error bars) against model calls per image, log scale: one line per reference
    family through its step counts, one star per policy labelled with its steps, and ``reference`` (a row name,
    e.g. ``"CFG 3"`` at the table's steps) as a dashed level to beat. Rows without a pass rate (no verifier) are left
    out. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "pass_rate" in row:
            series.setdefault(series_of(row, policies), []).append(row)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    policy_colours = plt.get_cmap("tab20b")  # apart from the reference lines' default colours
    policy_index = 0
    for name, points in series.items():
        points = sorted(points, key=lambda r: float(r["model_calls_per_image"]))
        xs = [float(r["model_calls_per_image"]) for r in points]
        ys = [100 * float(r["pass_rate"]) for r in points]
        err = [[100 * (float(r["pass_rate"]) - float(r["pass_rate_lo"])) for r in points],
               [100 * (float(r["pass_rate_hi"]) - float(r["pass_rate"])) for r in points]]
        if name in policies:
            steps = int(float(points[0]["num_steps"]))
            ax.errorbar(xs, ys, yerr=err, marker="*", markersize=12, linestyle="none", capsize=3,
                        color=policy_colours(policy_index % 20), label=f"{name} ({steps} step{'s' * (steps != 1)})")
            policy_index += 1
        else:
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=5, linestyle="-", capsize=3, color="0.25"
                        if name == "base" else None, label=name)
    level = next((r for r in rows if r.get("sampler") == reference and "pass_rate" in r), None)
    if level is not None:
        ax.axhline(100 * float(level["pass_rate"]), linestyle="--", color="0.5", linewidth=1,
                   label=f"{reference} at {int(float(level['model_calls_per_image']))} calls")
    ax.set_xscale("log", base=2)
    ticks = sorted({float(r["model_calls_per_image"]) for points in series.values() for r in points})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("base-model calls per image")
    ax.set_ylabel("held-out pass rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, Path(path))
