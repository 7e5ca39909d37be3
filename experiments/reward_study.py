"""A reward study: which reward, optimised, makes better images, and which one is hacked.

    python experiments/reward_study.py                         # 6 shapes rewards x 3 seeds, 1,024 images each
    python experiments/reward_study.py --budget smoke          # every code path in a few minutes (the tests)
    python experiments/reward_study.py --skip-training         # re-score and re-plot the runs in --out-dir
    python experiments/reward_study.py --wandb-mode online --wandb-entity me   # and create the W&B report

From one start (each training script's default policy: the shapes preset's affine guidance), one algorithm is
trained against each reward -- reward gradient for a differentiable reward, PPO (the best black-box algorithm
measured, docs/results.md) for the others -- with the same number of training images, for each seed
(``<out_dir>/runs/<reward>/seed<k>``, ``--parallel`` at a time, all in W&B group ``reward-study``, tagged with the
algorithm and the reward). Every run also scores its held-out evaluations with the rewards it is not trained on
(``eval/rewards/<name>``: :mod:`fluxguide.harness.monitoring`). Then every final policy, the base sampler and CFG
sample the held-out prompts on noise no training or selection step saw (``--eval-seed``), and every image is scored
by every reward and the exact verifier. The study writes in ``--out-dir``:

- ``matrix.md`` / ``.csv``: the reward x reward matrix (trained on the row, scored by the column; the last column
  is the held-out verifier's pass rate): each cell the change over the base sampler on the same noise, mean over
  seeds with a paired-bootstrap 90% interval (prompts of every seed resampled), and a verdict per reward
  (improves the verifier; hacked: its own score rose while the verifier or another reward fell beyond their
  intervals);
- ``curves.png``: per reward, each run's trained reward (on the held-out images and on its training batches) next
  to the held-out verifier, against samples seen;
- ``samples.png``: the same held-out prompts sampled by the base sampler, CFG and each reward's policy (seed 0);
- ``wandb_report.md`` (offline: the W&B report's description) or the report's URL (online).
"""

from __future__ import annotations

import csv
import importlib.util
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from fluxguide.algos.registry import SMOKE, get_algorithm
from fluxguide.backbones.base import sample_prompts
from fluxguide.backbones.registry import build_backbone
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_int, check_no_duplicates, check_writable_dir, validate
from fluxguide.harness.curves import save_figure
from fluxguide.harness.evaluation import EVAL_SEED_OFFSET, recommended_cfg_scale
from fluxguide.harness.grids import save_prompt_grid
from fluxguide.harness.launch import run_scripts
from fluxguide.harness.monitoring import hacking_signs
from fluxguide.harness.progress import LaneDisplay
from fluxguide.harness.statistics import paired_bootstrap_interval
from fluxguide.harness.tracking import Tracker, metric_curve, read_metrics, resolve_wandb_mode
from fluxguide.policies import load_guidance_model
from fluxguide.rewards.base import score_in_batches
from fluxguide.serialization import open_for_writing, refuse_links

#: The shapes world's rewards, a composite of two of them, and a hackable probe (mean brightness: a control whose
#: verdict must read "hacked").
STUDY_REWARDS = ("shapes-clip-retrieval", "shapes-clip", "shapes-aesthetic", "shapes-composite", "verifier-partial",
                 "brightness")
#: Training images (or trajectories) per run: the reward-gradient shapes preset's budget (64 updates of 16).
FULL_SAMPLES = 1024
#: The table's noise seed: the runs' own evaluations draw from their --seed (0, 1, 2, ...), this from 3000.
EVAL_SEED = 3000
#: The matrix's last column.
VERIFIER = "verifier pass rate"
#: Options that make an algorithm's default recipe treat every reward alike: reward gradient's shapes preset caps the
#: caption log-probability at a target of -0.1 (AlignProp), a value that would stop any other reward's gradient, so
#: the study trains every reward without a target.
SAME_FOR_EVERY_REWARD = {"reward-gradient": ("--reward-target", "None")}
#: The training reward's running mean in the curves, in updates.
SMOOTH = 8
#: The held-out evaluation of each run during training: 30 prompts x 4 images, four times per run.
RUN_EVAL = ("--eval-num-prompts", "30", "--eval-samples-per-prompt", "4")


@dataclass
class Config:
    out_dir: Path = Path("outputs/reward_study")
    """where the runs, matrix.md/.csv, curves.png, samples.png and the W&B report's description go"""
    rewards: tuple[str, ...] = STUDY_REWARDS
    """the rewards to train against (registry names of the shapes world's rewards, or any reward name)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """training seeds per reward"""
    budget: Literal["full", "smoke"] = "full"
    """'full': --samples training images per run; 'smoke': each algorithm's smoke budget (the tests)"""
    samples: int = FULL_SAMPLES
    """training images (or trajectories) per run of the full budget: the same for every reward"""
    differentiable_algorithm: str = "reward-gradient"
    """the algorithm trained on a differentiable reward (fluxguide.algos.registry)"""
    black_box_algorithm: str = "ppo"
    """the algorithm trained on a reward without a gradient (the verifier, ...)"""
    parallel: int = 2
    """runs at a time (one torch thread each)"""
    skip_training: bool = False
    """only score, plot and report the runs already in --out-dir"""
    eval_prompts: str = "shapes-heldout"
    """held-out prompts of the matrix: a named set, a text file with one prompt per line, or a spec"""
    eval_num_prompts: int | None = None
    """use the first N held-out prompts (default: all 90)"""
    eval_samples_per_prompt: int = 4
    """images per held-out prompt and policy (90 x 4 = 360 per seed)"""
    eval_seed: int = EVAL_SEED
    """noise seed of the matrix (no training run's evaluation draws from it)"""
    weights_dir: Path | None = None
    """shapes-world weight folder (default: the weights shipped in the package)"""
    wandb_mode: str | None = None
    """'online', 'offline' or 'disabled' (default: $WANDB_MODE, else offline); online also creates the report"""
    wandb_entity: str | None = None
    """W&B entity of the report (default: $WANDB_ENTITY); needed online"""
    wandb_project: str = "fluxguide"
    """W&B project of the runs and the report"""

    def validate(self) -> None:
        """Refuse bad values before any training starts (:class:`ConfigError` naming the flag)."""
        check_int("samples", self.samples)
        check_int("parallel", self.parallel)
        check_int("eval_num_prompts", self.eval_num_prompts, optional=True)
        check_int("eval_samples_per_prompt", self.eval_samples_per_prompt)
        for name in ("rewards", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} needs at least one value")
            check_no_duplicates(name, getattr(self, name))
        try:
            resolve_wandb_mode(self.wandb_mode)
        except ValueError as e:
            raise ConfigError(f"--wandb-mode: {e}") from None
        for flag in ("differentiable_algorithm", "black_box_algorithm"):
            stages = get_algorithm(getattr(self, flag)).stages  # an unknown name is refused here, listing them
            if len(stages) != 1:
                raise ConfigError(f"--{flag.replace('_', '-')} {getattr(self, flag)}: the study trains each reward "
                                  "with a one-script algorithm (an RL algorithm), not a pipeline of stages")
        check_writable_dir("out_dir", self.out_dir)


# ------------------------------------------------------------------------------------------------ training
def algorithm_for(cfg: Config, differentiable: bool) -> str:
    return cfg.differentiable_algorithm if differentiable else cfg.black_box_algorithm


def run_dir(cfg: Config, reward: str, seed: int) -> Path:
    return cfg.out_dir / "runs" / reward / f"seed{seed}"


def default_batch_size(algorithm: str) -> int:
    """The samples per update of the algorithm script's default recipe (its shapes preset)."""
    path = get_algorithm(algorithm).stages[0].path
    spec = importlib.util.spec_from_file_location(f"_study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.Config().optim.batch_size


def command(cfg: Config, reward: str, algorithm: str, seed: int, batch_size: int) -> list[str]:
    """One run's script and arguments: the algorithm's default recipe on ``reward`` at the study's budget."""
    stage = get_algorithm(algorithm).stages[0]
    common = ["--seed", str(seed), "--threads", "1", "--wandb-group", "reward-study",
              "--wandb-project", cfg.wandb_project, *(["--wandb-mode", cfg.wandb_mode] if cfg.wandb_mode else []),
              *(["--weights-dir", str(cfg.weights_dir)] if cfg.weights_dir else [])]
    if cfg.budget == "smoke":
        budget = [*stage.budgets.get("smoke", SMOKE)]
    else:  # the same images for every reward: updates of the script's own batch size, evaluated four times
        updates = max(1, cfg.samples // batch_size)
        every = str(max(1, updates // 4))
        budget = ["--total-updates", str(updates), "--eval-every", every, "--checkpoint-every", every, *RUN_EVAL]
    return (stage.command(run_dir(cfg, reward, seed), common, "") + budget
            + [*SAME_FOR_EVERY_REWARD.get(algorithm, ()), "--reward", reward])


def train_all(cfg: Config, algorithms: dict[str, str]) -> None:
    batch = {a: default_batch_size(a) if cfg.budget == "full" else 0 for a in set(algorithms.values())}
    jobs = [(r, s) for s in cfg.seeds for r in cfg.rewards]
    for reward, seed in jobs:
        refuse_links(run_dir(cfg, reward, seed), root=cfg.out_dir)
    print(f"training {len(jobs)} runs ({', '.join(f'{r}: {a}' for r, a in algorithms.items())}), {cfg.parallel} "
          f"at a time; each run's output goes to its log.txt under {cfg.out_dir / 'runs'}", flush=True)

    def train(reward: str, seed: int) -> None:
        algorithm, folder = algorithms[reward], run_dir(cfg, reward, seed)
        seconds = lanes.run(f"{reward} seed {seed}", [folder], lambda: run_scripts(
            [command(cfg, reward, algorithm, seed, batch[algorithm])], folder, root=cfg.out_dir,
            label=f"{reward} (seed {seed})"))
        tqdm.write(f"{reward:>22} seed {seed} ({algorithm}): done in {seconds / 60:.1f} min")

    with ThreadPoolExecutor(max_workers=cfg.parallel) as pool, LaneDisplay(cfg.parallel) as lanes, \
            tqdm(total=len(jobs), desc="training runs", position=0) as bar:
        for future in as_completed([pool.submit(train, *job) for job in jobs]):
            future.result()
            bar.update()


# ------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_all(cfg: Config, backbone, rewards: dict) -> tuple[dict[str, dict[str, torch.Tensor]], dict, list[str]]:
    """Per sampler (``base``, ``CFG <s>``, ``<reward>/seed<k>``): every reward's and the verifier's value per image
    on the table's noise; the first grid prompts' images per sampler; the held-out prompts."""
    prompts = resolve_prompts(cfg.eval_prompts)[: cfg.eval_num_prompts]
    n = cfg.eval_samples_per_prompt
    cfg_scale = recommended_cfg_scale(backbone)
    samplers = {"base": {}, f"CFG {cfg_scale:g}": {"cfg_scale": cfg_scale}}
    for reward in cfg.rewards:
        for seed in cfg.seeds:
            path = run_dir(cfg, reward, seed) / "guidance.safetensors"
            if not path.is_file():
                raise ConfigError(f"{path} does not exist: the run did not finish; rerun without --skip-training")
            samplers[f"{reward}/seed{seed}"] = {"guidance_model": load_guidance_model(path).eval()}
    grid_at = [i * n for i in range(0, len(prompts), max(1, len(prompts) // 8))][:8]
    scores, grid = {}, {}
    for name, sampler in tqdm(samplers.items(), desc="scoring samplers"):
        images, all_prompts = sample_prompts(backbone, prompts, samples_per_prompt=n,
                                             seed=cfg.eval_seed + EVAL_SEED_OFFSET, batch_size=128, **sampler)
        row = {r: score_in_batches(module, images, all_prompts, batch_size=128) for r, module in rewards.items()}
        row[VERIFIER] = backbone.verifier(images, all_prompts).passed.float()
        scores[name] = row
        grid[name] = images[grid_at]
    return scores, grid, [prompts[i // n] for i in grid_at]


def matrix(cfg: Config, scores: dict[str, dict[str, torch.Tensor]], cfg_name: str) -> list[dict]:
    """The matrix rows: per trained reward (and CFG), per scored column, the change over the base sampler with
    its paired-bootstrap 90% interval; seeds pooled (each seed's prompts are clusters of the resampling)."""
    columns = [*cfg.rewards, VERIFIER]
    rows = [{"trained on": "base sampler", **{f"{c}": float(scores["base"][c].mean()) for c in columns}}]
    for label, names in [(cfg_name, [cfg_name]), *((r, [f"{r}/seed{s}" for s in cfg.seeds]) for r in cfg.rewards)]:
        row: dict = {"trained on": label, "seeds": len(names) if label != cfg_name else 0}
        for c in columns:
            ours = torch.cat([scores[name][c] for name in names])
            base = torch.cat([scores["base"][c] for _ in names])
            gain, lo, hi = paired_bootstrap_interval(ours, base, cluster_size=cfg.eval_samples_per_prompt)
            row.update({c: float(ours.mean()), f"{c} gain": gain, f"{c} lo": lo, f"{c} hi": hi})
        rows.append(row)
    return rows


def verdict(cfg: Config, row: dict) -> str:
    """What the intervals say of a trained reward's row: **hacked** when its own score rose while the held-out
    verifier fell, or most of the other rewards fell (each beyond its interval); *improves the verifier* when the
    verifier rose; a single other reward that fell is named as a trade-off, not a hack (on 1,000 paired images a
    change of a hundredth is beyond its interval)."""
    reward = row["trained on"]
    others = [c for c in cfg.rewards if c != reward]
    fell = [c for c in others if row[f"{c} hi"] < 0]
    own_rose = reward in cfg.rewards and row[f"{reward} lo"] > 0
    verifier_fell = row[f"{VERIFIER} hi"] < 0
    changes = ", ".join(f"{c} {row[f'{c} gain']:+.3g}" for c in fell)
    trade = f" (trade-off: {changes} fell)" if fell else ""
    if own_rose and (verifier_fell or 2 * len(fell) > len(others)):
        what = ["the held-out verifier"] * verifier_fell + fell
        return f"**hacked**: its own score rose while {', '.join(what)} fell"
    if row[f"{VERIFIER} lo"] > 0:
        return "improves the verifier" + trade
    if own_rose:
        return "raises its own score; the verifier did not move beyond its interval" + trade
    return "no change beyond the intervals" + trade


def training_flags(cfg: Config, reward: str) -> str:
    """How many of the reward's runs the in-training diagnostics flag (first to last held-out evaluation)."""
    flagged = 0
    for seed in cfg.seeds:
        evals = [r for r in read_metrics(run_dir(cfg, reward, seed)) if "eval/verifier_pass_rate" in r]
        flagged += len(evals) > 1 and hacking_signs(evals[0], evals[-1], reward).hacked
    return f"{flagged} of {len(cfg.seeds)}"


def markdown(cfg: Config, rows: list[dict], algorithms: dict[str, str], images: int) -> str:
    """The matrix and the verdicts as markdown, with the command."""
    columns = [*cfg.rewards, VERIFIER]
    base = rows[0]
    lines = [f"| trained on (algorithm) | {' | '.join(columns)} |", "|---|" + "---|" * len(columns),
             "| base sampler (value) | " + " | ".join(f"{base[c]:.4g}" for c in columns) + " |"]
    for row in rows[1:]:
        label = row["trained on"] + (f" ({algorithms[row['trained on']]})" if row["trained on"] in algorithms else "")
        cells = []
        for c in columns:
            scale = 100 if c == VERIFIER else 1
            cell = f"{scale * row[f'{c} gain']:+.3g} [{scale * row[f'{c} lo']:+.3g}, {scale * row[f'{c} hi']:+.3g}]"
            cells.append(f"**{cell}**" if c == row["trained on"] else cell)
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "| reward | algorithm | verdict (held-out matrix) | runs flagged during training |", "|---|---|---|---|"]
    lines += [f"| {r['trained on']} | {algorithms[r['trained on']]} | {verdict(cfg, r)} | "
              f"{training_flags(cfg, r['trained on'])} |" for r in rows[2:]]
    lines += ["", (f"Cells: the change over the base sampler on the same prompts and noise (seed {cfg.eval_seed}), mean "
              f"over {len(cfg.seeds)} training seeds x {images} images, with its paired-bootstrap 90% interval "
              "(the verifier column in points); the diagonal in bold. The first row is the base sampler's own values.")]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> list[dict]:
    validate(cfg)
    start = time.perf_counter()
    backbone = build_backbone("shapes", weights_dir=cfg.weights_dir)
    rewards = {name: backbone.build_reward(name) for name in cfg.rewards}  # unknown names refused before training
    algorithms = {name: algorithm_for(cfg, getattr(module, "differentiable", True)) for name, module in rewards.items()}
    if not cfg.skip_training:
        train_all(cfg, algorithms)
    scores, grid, grid_prompts = score_all(cfg, backbone, rewards)
    cfg_name = next(name for name in scores if name.startswith("CFG"))
    rows = matrix(cfg, scores, cfg_name)
    text = markdown(cfg, rows, algorithms, images=len(scores["base"][VERIFIER]))
    with open_for_writing(cfg.out_dir / "matrix.md") as f:
        f.write(text)
    with open_for_writing(cfg.out_dir / "matrix.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    curves = plot_curves(cfg)
    samples = save_prompt_grid({"base": grid["base"], cfg_name: grid[cfg_name],
                                **{r: grid[f"{r}/seed{cfg.seeds[0]}"] for r in cfg.rewards}}, grid_prompts,
                               cfg.out_dir / "samples.png", root=cfg.out_dir)
    report = publish(cfg, text, algorithms, monitored=sorted({*cfg.rewards, *backbone.monitor_rewards()}))
    refuse_links(cfg.out_dir / "wandb_study")
    with Tracker(cfg.out_dir / "wandb_study", config={k: str(v) for k, v in asdict(cfg).items()},
                 project=cfg.wandb_project, group="reward-study-summary", mode=cfg.wandb_mode,
                 tags=("reward-study", *cfg.rewards)) as tracker:
        tracker.log_image("eval/curves", curves, 0)
        tracker.log_image("eval/samples", samples, 0)
        tracker.log_table("eval/reward_matrix", rows)
    print(f"\n{text}\nall done in {(time.perf_counter() - start) / 60:.1f} min. Results in {cfg.out_dir}: matrix.md, "
          f"matrix.csv, curves.png, samples.png; W&B report: {report}")
    return rows


def plot_curves(cfg: Config) -> Path:
    """curves.png: per reward, each run's trained reward on the held-out images (right axis, dashed) and on its
    training batches (dotted, a running mean of :data:`SMOOTH` updates) next to the held-out verifier's pass rate
    (left axis), against samples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.rewards), figsize=(4.2 * len(cfg.rewards), 3.6), squeeze=False)
    for ax, reward in zip(axes[0], cfg.rewards):
        twin = ax.twinx()
        for seed in cfg.seeds:
            records = read_metrics(run_dir(cfg, reward, seed))
            evals = [r for r in records if "eval/verifier_pass_rate" in r]
            x = [r["charts/samples_seen"] for r in evals]
            line = ax.plot(x, [r["eval/verifier_pass_rate"] for r in evals], marker=".", label=f"seed {seed}")[0]
            twin.plot(x, [r.get(f"eval/rewards/{reward}", float("nan")) for r in evals], linestyle="--",
                      color=line.get_color())
            train_x, train_y = metric_curve(records, "train/reward_mean")
            if len(train_y) >= SMOOTH:  # the per-update training reward, a running mean (it is noisy)
                twin.plot(train_x[SMOOTH - 1:], torch.tensor(train_y).unfold(0, SMOOTH, 1).mean(1).tolist(),
                          linestyle=":", color=line.get_color(), alpha=0.7)
        ax.set_title(reward, fontsize=10)
        ax.set_xlabel("training samples seen")
        ax.set_ylabel("held-out verifier pass rate", fontsize=8)
        twin.set_ylabel("trained reward: held-out --, training ··", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, cfg.out_dir / "curves.png")


def publish(cfg: Config, text: str, algorithms: dict[str, str], monitored: list[str]) -> str:
    """The W&B report of the study: created online, described in the out folder otherwise."""
    from fluxguide.harness.dashboards import resolve_entity, study_report, write_report

    mode = resolve_wandb_mode(cfg.wandb_mode)
    head, _, verdicts = text.partition("\n\n| reward | algorithm")
    report = study_report(entity=resolve_entity(cfg.wandb_entity, mode), project=cfg.wandb_project, group="reward-study",
                          rewards=algorithms, monitored=monitored, matrix_markdown=head,
                          verdicts_markdown="| reward | algorithm" + verdicts)
    return str(write_report(report, cfg.out_dir, mode=mode))


if __name__ == "__main__":
    cli(main, Config)
