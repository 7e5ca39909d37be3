"""Train a guidance policy with every algorithm, evaluate them side by side, and plot their curves.

    python experiments/compare.py                        # the README's main job: ~12 min on 2 cores
    python experiments/compare.py --budget full          # four times the samples
    python experiments/compare.py --seeds 0 1 2          # mean and spread over seeds
    python experiments/compare.py --skip-training        # re-plot / re-evaluate finished runs in --out-dir

The algorithms are those of the registry (``fluxguide.algos.registry``: ``--algorithms`` alone lists them; the
main job trains reward gradient, PPO and behaviour cloning, ``--budget smoke`` every one, and an installed
package's or a spec ``pkg.module:SPEC`` runs the same way). For each algorithm and seed it runs the algorithm's
own scripts (``train_reward_gradient.py``; ``collect_data.py`` + ``train_bc.py`` for CFG-distillation behaviour
cloning; those two then ``train_reward_gradient.py --preset shapes-distilled`` for ``reward-gradient-distilled``;
...; :func:`fluxguide.harness.launch.run_algorithm`, which skips the stages that finished before) as subprocesses with their default recipe (the shapes preset), the budget's options and
``--run-dir <out_dir>/runs/<algorithm>/seed<k>``, ``--parallel`` at a time. Each run logs its own W&B run
(offline unless ``--wandb-mode online``) in group ``<algorithm>``, so they overlay in one W&B workspace against
``charts/samples_seen``. Then it writes, in ``--out-dir``:

- ``curves.png``: held-out verifier pass rate against samples seen and against wall time, and each run's
  training reward, mean and spread (min-max) over seeds;
- ``evaluation.md`` / ``.csv`` and ``samples.png``: every algorithm's policy (first seed) next to the base
  sampler and CFG (and best-of-N with ``--best-of``) on all 90 held-out prompts x 4 images, on noise that no
  training run saw (``--eval-seed``) (``experiments/evaluate.py``'s table: each sampler's pass
  rate with its 90% interval, each one's gain over the base sampler with a paired-bootstrap 90% interval);

and logs both to a W&B run of group ``compare``. It ends with one verdict line per algorithm ("ppo: +5.0 points
over base, 90% interval [+1.2, +8.9]: above base"); ``experiments/report.py`` summarises the runs over seeds.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from fluxguide.algos.registry import (
    ALGORITHMS,
    AlgorithmSpec,
    algorithm_names,
    get_algorithm,
    main_job_algorithms,
    register_algorithm,
)
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_int, check_no_duplicates, check_writable_dir, validate
from fluxguide.harness.curves import save_figure
from fluxguide.harness.launch import run_algorithm
from fluxguide.harness.progress import LaneDisplay
from fluxguide.harness.tracking import Tracker, read_metrics, resolve_wandb_mode
from fluxguide.plugins import is_spec
from fluxguide.serialization import refuse_links

EXPERIMENTS = Path(__file__).resolve().parent

#: The evaluation noise of the comparison table: the training scripts draw their own held-out evaluation noise from
#: their --seed, so this seed's noise is seen by no training or model-selection step.
EVAL_SEED = 1000


@dataclass
class Config:
    out_dir: Path = Path("outputs/compare")
    """where the runs, curves.png, evaluation.md/.csv and samples.png go"""
    budget: Literal["smoke", "quick", "full"] = "quick"
    """training budgets: 'quick' (each script's default budget: the main job and the README's headline), 'full'
    (four times the samples), 'smoke' (every code path in a minute: the tests)"""
    algorithms: tuple[str, ...] | None = None
    """algorithms to train and compare: registered names (fluxguide.algos.registry) or specs 'pkg.module:SPEC'
    (default: the main job's, reward-gradient ppo bc; with --budget smoke, every registered one). Given without a
    value, lists every registered algorithm and exits"""
    seeds: tuple[int, ...] = (0,)
    """one run per algorithm and seed; curves show the mean and the min-max spread"""
    parallel: int = 2
    """runs at a time (one torch thread each)"""
    skip_training: bool = False
    """only plot and evaluate the runs already in out_dir"""
    eval_num_prompts: int | None = None
    """held-out prompts of the final comparison table (default: all 90)"""
    eval_samples_per_prompt: int = 4
    """images per held-out prompt in the table (90 x 4 = 360 images: a gain's 90% interval is about +-5 points)"""
    eval_seed: int = EVAL_SEED
    """noise seed of the comparison table (the training runs' own evaluations use their --seed)"""
    best_of: tuple[int, ...] = ()
    """best-of-N rows of the table (e.g. 4 8; each costs N times the base sampler)"""
    pareto_steps: tuple[int, ...] = ()
    """also put the base sampler and CFG at these step counts in the table (e.g. 1 2 4 8 20) and draw pareto.png:
    pass rate against base-model calls per image, each policy at the steps it was trained at"""
    weights_dir: Path | None = None
    """shapes-world weight folder (default: the weights shipped in the package)"""
    wandb_mode: str | None = None
    """'online', 'offline' or 'disabled' (default: $WANDB_MODE, else offline)"""

    def validate(self) -> None:
        """Refuse bad values before any training starts (:class:`ConfigError` naming the flag)."""
        check_int("parallel", self.parallel)
        check_int("eval_num_prompts", self.eval_num_prompts, optional=True)
        check_int("eval_samples_per_prompt", self.eval_samples_per_prompt)
        for n in self.best_of:
            check_int("best_of", n)
        for n in self.pareto_steps:
            check_int("pareto_steps", n)
        if not self.seeds:
            raise ConfigError("--seeds needs at least one value")
        if self.algorithms is None:
            self.algorithms = tuple(algorithm_names()) if self.budget == "smoke" else main_job_algorithms()
        check_no_duplicates("seeds", self.seeds)
        check_no_duplicates("best_of", self.best_of)
        try:
            resolve_wandb_mode(self.wandb_mode)
        except ValueError as e:
            raise ConfigError(f"--wandb-mode: {e}") from None
        check_writable_dir("out_dir", self.out_dir)
        self.algorithms = tuple(resolve_algorithm(name).name for name in self.algorithms)
        check_no_duplicates("algorithms", self.algorithms)


def resolve_algorithm(name: str) -> AlgorithmSpec:
    """The registered algorithm ``name``; a spec ``pkg.module:SPEC`` is registered under its own name, so its
    runs, curves and table rows carry that name. Refused before any training: a missing script."""
    spec = get_algorithm(name)
    if is_spec(name):
        known = ALGORITHMS.registered().get(spec.name)
        if known is not None and known is not spec:
            raise ConfigError(f"--algorithms {name}: its name {spec.name!r} is taken by a registered algorithm; "
                              "give the AlgorithmSpec another name")
        register_algorithm(spec, overwrite=True)
    missing = [str(stage.path) for stage in spec.stages if not stage.path.is_file()]
    if missing:
        raise ConfigError(f"--algorithms {name}: its script {', '.join(missing)} does not exist")
    return spec


def run_dir(cfg: Config, algorithm: str, seed: int) -> Path:
    return cfg.out_dir / "runs" / algorithm / f"seed{seed}"


def common_args(cfg: Config, seed: int) -> list[str]:
    """The options every stage of every run gets: its seed, one thread, the W&B mode, the weights."""
    common = ["--seed", str(seed), "--threads", "1"] + (["--wandb-mode", cfg.wandb_mode] if cfg.wandb_mode else [])
    return common + (["--weights-dir", str(cfg.weights_dir)] if cfg.weights_dir else [])


def train(cfg: Config, algorithm: str, seed: int, lanes: LaneDisplay | None = None) -> float:
    """Run one algorithm's scripts (the stages that did not finish before), shown in ``lanes``; returns the wall
    seconds. Output goes to ``<run>/log.txt``."""
    out = run_dir(cfg, algorithm, seed)
    spec = get_algorithm(algorithm)
    folders = (*spec.preparation(out), spec.training_run(out))  # e.g. BC's dataset and run folders
    for folder in folders:
        refuse_links(folder, root=cfg.out_dir)
    start = time.perf_counter()
    (lanes or LaneDisplay(0, disable=True)).run(f"{algorithm} seed {seed}", folders, lambda: run_algorithm(
        spec, out, budget=cfg.budget, args=common_args(cfg, seed), root=cfg.out_dir, progress=False,
        label=f"{algorithm} (seed {seed})"))
    seconds = time.perf_counter() - start
    tqdm.write(f"{algorithm:>16} seed {seed}: done in {seconds / 60:.1f} min ({out})")
    return seconds


def host(cfg: Config, algorithm: str) -> str:
    """The algorithm whose runs compute ``algorithm``'s: another one of the comparison whose run does it on its way
    (``bc`` inside ``reward-gradient-distilled``: the same collection and distillation, trained once), else
    itself."""
    spec = get_algorithm(algorithm)
    return next((other for other in cfg.algorithms if spec.computed_by(get_algorithm(other))), algorithm)


def stage_folders(cfg: Config, algorithm: str, seed: int) -> list[Path]:
    """The folders of ``algorithm``'s stages for ``seed`` (inside its host's run folder)."""
    owner = host(cfg, algorithm)
    out = run_dir(cfg, owner, seed)
    return [out / stage.folder for stage in get_algorithm(owner).stages[: len(get_algorithm(algorithm).stages)]]


def training_run(cfg: Config, algorithm: str, seed: int) -> Path:
    """The folder holding the run's metrics.jsonl and guidance.safetensors."""
    return stage_folders(cfg, algorithm, seed)[-1]


def collection_offset(cfg: Config, algorithm: str, seed: int) -> tuple[int, float]:
    """The cost of the stages before training (BC's data collection): images sampled and wall seconds."""
    images, seconds = 0, 0.0
    for folder in stage_folders(cfg, algorithm, seed)[:-1]:
        records = read_metrics(next(folder.glob("run_seed*"), folder))  # a collection logs under run_seed<k>/
        if records:
            images += int(records[-1].get("charts/samples_seen", 0))
            seconds += float(records[-1].get("perf/wall_seconds", 0.0))
    return images, seconds


def plot(cfg: Config) -> Path:
    """curves.png: verifier pass rate vs samples seen and vs wall time, training reward vs samples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = [(axes[0], "eval/verifier_pass_rate", "charts/samples_seen", "held-out verifier pass rate"),
              (axes[1], "eval/verifier_pass_rate", "perf/wall_seconds", "held-out verifier pass rate"),
              (axes[2], "train/reward_mean", "charts/samples_seen", "training reward (each run's own)")]
    for ax, metric, xkey, title in panels:
        for algorithm in cfg.algorithms:
            curves = []
            for seed in cfg.seeds:
                records = read_metrics(training_run(cfg, algorithm, seed))
                images, seconds = collection_offset(cfg, algorithm, seed)
                pairs = [(r[xkey], r[metric]) for r in records if metric in r and xkey in r]
                spec = get_algorithm(algorithm)
                if len(spec.stages) > 1 and xkey == "charts/samples_seen":
                    # A collected dataset's cost in samples is its images: a run that trains on its pairs sits at
                    # the images collected; one that samples images (the chain's RL stage) continues from there.
                    if getattr(spec.algorithm, "sample_unit", "image") == "pair":
                        pairs = [(images, y) for _, y in pairs[-1:]]
                    else:
                        pairs = [(x + images, y) for x, y in pairs]
                elif xkey == "perf/wall_seconds":
                    pairs = [(x + seconds, y) for x, y in pairs]
                if pairs:
                    curves.append(pairs)
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = torch.tensor([[c[i][0] for i in range(n)] for c in curves], dtype=torch.float64).mean(0)
            ys = torch.tensor([[c[i][1] for i in range(n)] for c in curves], dtype=torch.float64)
            if xkey == "perf/wall_seconds":
                xs = xs / 60
            marker = "*" if n == 1 else "."
            line = ax.plot(xs, ys.mean(0), marker=marker, markersize=10 if n == 1 else 5,
                           label=f"{algorithm} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")[0]
            if len(curves) > 1:
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, alpha=0.2, color=line.get_color())
        ax.set_xlabel("wall time (min)" if xkey == "perf/wall_seconds" else "samples seen")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    return save_figure(fig, cfg.out_dir / "curves.png")


def list_algorithms() -> list[str]:
    """One line per registered algorithm: name, what it needs of the reward, scripts, description."""
    lines = []
    for name in algorithm_names():
        spec = get_algorithm(name)
        scripts = " + ".join(stage.path.name + (f" {' '.join(stage.args)}" if stage.args else "") for stage in spec.stages)
        lines.append(f"{name:<18} {spec.reward:<14} {scripts:<45} {spec.description}")
    return lines


def main(cfg: Config) -> list[dict]:
    if cfg.algorithms == ():  # --algorithms without a value: the list
        print("\n".join(list_algorithms()))
        return []
    validate(cfg)  # every option, and that out_dir is writable, before any training
    start = time.perf_counter()
    if not cfg.skip_training:
        # The longest runs first (AlgorithmSpec.minutes), so that the lanes end together. An algorithm whose
        # stages another one's run computes on its way is trained there, once.
        jobs = sorted(((a, s) for s in cfg.seeds for a in cfg.algorithms if host(cfg, a) == a),
                      key=lambda job: -get_algorithm(job[0]).minutes)
        print(f"training {len(jobs)} runs, {cfg.parallel} at a time; each run's output goes to its log.txt under "
              f"{cfg.out_dir / 'runs'}", flush=True)
        with ThreadPoolExecutor(max_workers=cfg.parallel) as pool, LaneDisplay(cfg.parallel) as lanes, \
                tqdm(total=len(jobs), desc="training runs", unit="run", position=0) as bar:
            for future in as_completed([pool.submit(train, cfg, *job, lanes) for job in jobs]):
                future.result()
                bar.update()
    curves = plot(cfg)

    evaluate = _load_script("evaluate")
    policies = tuple(training_run(cfg, a, cfg.seeds[0]) for a in cfg.algorithms)
    rows = evaluate.main(evaluate.Config(
        policies=policies, names=cfg.algorithms, out_dir=cfg.out_dir, weights_dir=cfg.weights_dir,
        num_prompts=cfg.eval_num_prompts, samples_per_prompt=cfg.eval_samples_per_prompt, best_of=cfg.best_of,
        seed=cfg.eval_seed, threads=2, pareto_steps=cfg.pareto_steps,
    ))
    refuse_links(cfg.out_dir / "wandb_compare")
    with Tracker(cfg.out_dir / "wandb_compare", config={k: str(v) for k, v in asdict(cfg).items()},
                 group="compare", mode=cfg.wandb_mode, tags=(cfg.budget, *cfg.algorithms)) as tracker:
        tracker.log_image("eval/curves", curves, 0)
        tracker.log_image("eval/samples", cfg.out_dir / "samples.png", 0)
        tracker.log_table("eval/comparison", rows)
    print(f"\nall done in {(time.perf_counter() - start) / 60:.1f} min. Results in {cfg.out_dir}:")
    outputs = ["curves.png", "evaluation.md", "evaluation.csv", "samples.png"]
    if cfg.pareto_steps:
        outputs.append("pareto.png")
    for name in outputs:
        print(f"  {cfg.out_dir / name}")
    print(f"  W&B runs (offline unless online was asked for): {cfg.out_dir}/runs/*/*/**/wandb, "
          f"{cfg.out_dir}/wandb_compare/wandb; upload with `wandb sync <folder>/offline-run-*`")
    print(f"  a report over the seeds: python experiments/report.py --runs '{cfg.out_dir}/runs/*/seed*'")
    print(f"\nheld-out verifier pass rate, gain over the base sampler on the same noise (seed {cfg.seeds[0]}):")
    for line in evaluate.summary(rows, policies=list(cfg.algorithms)):
        print(f"  {line}")
    return rows


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    cli(main, Config)
