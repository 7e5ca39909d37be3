"""Held-out evaluation of guidance policies, shared by the training, evaluation and comparison scripts.

A fixed prompt set sampled with fixed noise (so evaluations of one run, and of different runs with one seed,
are paired comparisons), scored by the rewards and by the backbone's exact verifier when it has one.
:func:`evaluate_guidance` is the periodic evaluation of a training run; :func:`compare_samplers` puts a
policy next to the base sampler, CFG and best-of-N, each with its cost in base-model calls per image, its held-out
pass rate with a 90% interval and its gain over the base sampler with a paired-bootstrap 90% interval
(:mod:`fluxguide.harness.statistics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxguide.backbones.base import Backbone, sample_prompts
from fluxguide.harness.monitoring import IMAGES, RewardMonitor, reward_metrics
from fluxguide.harness.statistics import bootstrap_interval, paired_bootstrap_interval
from fluxguide.rewards.base import REGISTRY_NAME_ATTR, score_in_batches
from fluxguide.sampling.denoise import GuidanceFn, GuidanceScale
from fluxguide.serialization import open_for_writing

#: The metrics shown in the caption of an evaluation's sample grid.
CAPTION_METRICS: tuple[str, ...] = ("eval/verifier_pass_rate", "eval/reward_mean")
#: The columns a comparison adds for its intervals (:func:`compare_samplers`), in the table's order.
INTERVAL_COLUMNS: tuple[str, ...] = ("pass_rate", "pass_rate_lo", "pass_rate_hi", "gain_vs_base", "gain_lo", "gain_hi",
                                     "gain_vs_cfg", "vs_cfg_lo", "vs_cfg_hi", "images")
#: Evaluation noise is seeded with ``seed + EVAL_SEED_OFFSET``, away from the training streams.
EVAL_SEED_OFFSET = 12345


def recommended_cfg_scale(backbone: Backbone) -> float:
    """The CFG scale to compare against: the backbone's ``recommended_cfg_scale`` if it names one (the shapes world:
    3), else its ``default_cfg_scale``."""
    scale = backbone.recommended_cfg_scale
    return float(backbone.default_cfg_scale if scale is None else scale)


@torch.no_grad()
def evaluate_guidance(
    backbone: Backbone,
    reward: nn.Module,
    policy: GuidanceFn | None,
    prompts: list[str],
    *,
    samples_per_prompt: int = 2,
    seed: int = 0,
    guidance_scale: GuidanceScale = 1.0,
    num_steps: int | None = None,
    cfg_scale: float = 1.0,
    batch_size: int = 64,
    monitor: RewardMonitor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Sample ``prompts`` with the guided sampler and score them.

    Args:
        backbone: the base model.
        reward: reward module ``(images, prompts) -> (B,)``.
        policy: the guidance model (``None``: the base sampler). Put in eval mode for the call.
        prompts: the evaluation prompts; each is sampled ``samples_per_prompt`` times.
        seed: the noise seed (offset by :data:`EVAL_SEED_OFFSET`).
        guidance_scale, num_steps, cfg_scale: sampler settings.
        batch_size: images per sampler call.
        monitor: rewards the policy is not trained on, scored on the same images (reward-hacking diagnostics).

    Returns:
        ``eval/reward_mean``, ``eval/reward_std``, ``eval/images``, the trained reward again as
        ``eval/rewards/<its registry name>`` with the monitored ones and their standard errors
        (:func:`~fluxguide.harness.monitoring.reward_metrics`) and, when the backbone has a verifier,
        ``eval/verifier_pass_rate`` and ``eval/verifier_<attribute>``; and the images ``(len(prompts) * samples_per_prompt, 3, H, W)``
        (prompt-major).
    """
    was_training = isinstance(policy, nn.Module) and policy.training
    if isinstance(policy, nn.Module):
        policy.eval()
    try:
        images, all_prompts = sample_prompts(backbone, prompts, samples_per_prompt=samples_per_prompt,
                                             seed=seed + EVAL_SEED_OFFSET, guidance_model=policy,
                                             guidance_scale=guidance_scale, num_steps=num_steps,
                                             cfg_scale=cfg_scale, batch_size=batch_size)
    finally:
        if was_training:
            policy.train()
    rewards = score_in_batches(reward, images, all_prompts, batch_size=batch_size, device=backbone.device)
    metrics = {"eval/reward_mean": float(rewards.mean()),
               "eval/reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0, IMAGES: len(rewards)}
    trained = getattr(reward, REGISTRY_NAME_ATTR, None)
    if isinstance(trained, str) and trained:  # under its name too: every run of a reward study has the same curves
        metrics.update(reward_metrics(trained, rewards))
    if monitor is not None:
        metrics.update(monitor(images, all_prompts))
    if backbone.verifier is not None:
        result = backbone.verifier(images, all_prompts)
        metrics["eval/verifier_pass_rate"] = result.accuracy
        metrics.update({f"eval/verifier_{k}": float(v.mean()) for k, v in result.scores.items()})
    return metrics, images


@dataclass
class SamplerSpec:
    """One row of a sampler comparison.

    Attributes:
        name: the row's label.
        policy: a guidance model (``None``: no learned guidance).
        guidance_scale: scale of the policy's correction.
        cfg_scale: classifier-free guidance (1 = off; two base-model calls per step otherwise).
        best_of: sample this many candidates per image and keep the one the picking reward scores highest.
        num_steps: this row's sampling steps (``None``: the comparison's): rows at several step counts on the same
            noise put pass rate against model calls (a few-step policy next to the 20-step samplers).
    """

    name: str
    policy: GuidanceFn | None = None
    guidance_scale: float = 1.0
    cfg_scale: float = 1.0
    best_of: int = 1
    num_steps: int | None = None

    def model_calls_per_image(self, num_steps: int) -> int:
        """Base-model forward passes per kept image."""
        return num_steps * (1 if self.cfg_scale == 1.0 else 2) * self.best_of


@torch.no_grad()
def compare_samplers(
    backbone: Backbone,
    specs: list[SamplerSpec],
    prompts: list[str],
    rewards: dict[str, nn.Module],
    *,
    pick_reward: str,
    samples_per_prompt: int = 2,
    seed: int = 0,
    num_steps: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    reference: str | None = "base",
    cfg_reference: str | None = None,
) -> tuple[list[dict[str, float | str]], dict[str, torch.Tensor]]:
    """Sample ``prompts`` with every sampler (same noise for the first candidate of each) and score them.

    Args:
        backbone: the base model (its verifier, if it has one, scores every sampler).
        specs: the samplers to compare.
        prompts: held-out prompts, each sampled ``samples_per_prompt`` times.
        rewards: name -> reward module; every kept image is scored by each.
        pick_reward: the reward (a key of ``rewards``) that picks the best of N candidates.
        seed: noise seed (offset by :data:`EVAL_SEED_OFFSET`).
        num_steps: sampling steps of the rows that do not set their own (default: the backbone's).
        progress: show a progress bar over the samplers and print one line per finished sampler.
        reference: the sampler (a spec name) every other one is compared with, image slot by image slot
            (``None``: no gains). Policies and CFG see its noise exactly; best-of-N's candidates are other
            draws for the same prompt slots, so its pairing is by prompt.

    Returns:
        One row per sampler -- ``sampler``, ``num_steps``, ``model_calls_per_image``, ``seconds_per_image``,
        ``verifier_pass_rate``, ``verifier_<attribute>``, ``reward/<name>`` and, with a verifier,
        ``images``, ``pass_rate``, ``pass_rate_lo``, ``pass_rate_hi`` (90% percentile bootstrap over prompts) and,
        on every row but the reference's, ``gain_vs_base``, ``gain_lo``, ``gain_hi`` (the pass rate minus the
        reference's, with its paired bootstrap 90% interval over prompts), and with ``cfg_reference`` (the name of
        a sampler listed before the policies, e.g. ``"CFG 3"``) ``gain_vs_cfg``, ``vs_cfg_lo``, ``vs_cfg_hi`` the
        same against it on the rows after it -- and the kept images per sampler,
        ``(len(prompts) * samples_per_prompt, 3, H, W)`` prompt-major.
    """
    if pick_reward not in rewards:
        raise ValueError(f"pick_reward {pick_reward!r} is not one of the rewards {sorted(rewards)}")
    names = [spec.name for spec in specs]
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the samplers {names}")
    if reference is not None:  # the reference first, so every other row can be paired with it
        specs = sorted(specs, key=lambda spec: spec.name != reference)
    default_steps = len(backbone.schedule(num_steps)) - 1  # refuses 0 and negatives; None: the backbone's default
    rows, kept, passed = [], {}, {}
    from tqdm import tqdm

    for spec in (bar := tqdm(specs, desc="samplers", disable=not progress)):
        bar.set_postfix(sampler=spec.name)
        if spec.best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {spec.best_of} for sampler {spec.name!r}")
        if isinstance(spec.policy, nn.Module):
            spec.policy.eval()
        steps = default_steps if spec.num_steps is None else len(backbone.schedule(spec.num_steps)) - 1
        start = time.perf_counter()
        # Candidate k of sample j of a prompt is sample j * best_of + k: candidate 0 of best-of-1 is the noise
        # every other sampler sees first.
        images, _ = sample_prompts(backbone, prompts, samples_per_prompt=samples_per_prompt * spec.best_of,
                                   seed=seed + EVAL_SEED_OFFSET, cfg_scale=spec.cfg_scale, guidance_model=spec.policy,
                                   guidance_scale=spec.guidance_scale, num_steps=steps, batch_size=batch_size)
        all_prompts = [p for p in prompts for _ in range(samples_per_prompt * spec.best_of)]
        if spec.best_of > 1:
            scores = score_in_batches(rewards[pick_reward], images, all_prompts, batch_size=batch_size,
                                      device=backbone.device)
            best = scores.view(-1, spec.best_of).argmax(1)
            images = images.view(-1, spec.best_of, *images.shape[1:])[torch.arange(len(best)), best]
        seconds = time.perf_counter() - start
        final_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        row: dict[str, float | str] = {
            "sampler": spec.name,
            "num_steps": steps,
            "model_calls_per_image": spec.model_calls_per_image(steps),
            "seconds_per_image": seconds / len(final_prompts),
        }
        if backbone.verifier is not None:
            result = backbone.verifier(images, final_prompts)
            row["verifier_pass_rate"] = result.accuracy
            row.update({f"verifier_{k}": float(v.mean()) for k, v in result.scores.items()})
            passed[spec.name] = result.passed.float().cpu()
            row.update(_interval_columns(passed, spec.name, reference, samples_per_prompt))
            if cfg_reference in passed and spec.name not in (reference, cfg_reference):
                gain, lo, hi = paired_bootstrap_interval(passed[spec.name], passed[cfg_reference],
                                                         cluster_size=samples_per_prompt)
                row.update({"gain_vs_cfg": gain, "vs_cfg_lo": lo, "vs_cfg_hi": hi})
        for name, reward in rewards.items():
            row[f"reward/{name}"] = float(score_in_batches(reward, images, final_prompts, batch_size=batch_size,
                                                              device=backbone.device).mean())
        rows.append(row)
        kept[spec.name] = images
        if progress:
            bar.write(sampler_line(row))
    order = {name: i for i, name in enumerate(names)}  # the caller's order
    rows.sort(key=lambda row: order[row["sampler"]])
    return rows, {name: kept[name] for name in names}


def _interval_columns(passed: dict[str, torch.Tensor], name: str, reference: str | None,
                      samples_per_prompt: int) -> dict[str, float]:
    """``images``, ``pass_rate`` with its interval and, against ``reference``, ``gain_vs_base`` with its paired
    interval; whole prompts are resampled (their images share the prompt)."""
    outcomes = passed[name]
    rate, lo, hi = bootstrap_interval(outcomes, cluster_size=samples_per_prompt)
    columns = {"images": len(outcomes), "pass_rate": rate, "pass_rate_lo": lo, "pass_rate_hi": hi}
    if reference is not None and name != reference:
        gain, lo, hi = paired_bootstrap_interval(outcomes, passed[reference], cluster_size=samples_per_prompt)
        columns.update({"gain_vs_base": gain, "gain_lo": lo, "gain_hi": hi})
    return columns


def sampler_line(row: dict[str, float | str]) -> str:
    """One finished sampler of a comparison in a line: pass rate and interval, gain, cost."""
    r = row
    line = f"{r['sampler']:>28}:"
    if "pass_rate" in r:
        line += f" pass rate {r['pass_rate']:.3f} [{r['pass_rate_lo']:.3f}, {r['pass_rate_hi']:.3f}]"
    if "gain_vs_base" in r:
        line += f", gain {100 * r['gain_vs_base']:+.1f} points [{100 * r['gain_lo']:+.1f}, {100 * r['gain_hi']:+.1f}]"
    return line + f", {r['model_calls_per_image']} model calls and {r['seconds_per_image']:.3f} s per image"


def write_table(rows: list[dict[str, float | str]], path: str | Path) -> tuple[Path, Path]:
    """Write ``rows`` as ``<path>.md`` (a markdown table) and ``<path>.csv``; returns both paths."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if "seconds_per_image" in columns:  # the intervals next to the cost, before the attribute and reward columns
        moved = [c for c in INTERVAL_COLUMNS if c in columns]
        columns = [c for c in columns if c not in moved]
        at = columns.index("seconds_per_image") + 1
        columns[at:at] = moved

    def fmt(value: float | str | None) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    md, csv_path = path.with_suffix(".md"), path.with_suffix(".csv")
    with open_for_writing(md) as f:  # never through a link (fluxguide.serialization)
        f.write("\n".join(lines) + "\n")
    with open_for_writing(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path


class HeldoutEvaluator:
    """The periodic held-out evaluation of a training run: metrics to the tracker plus a sample grid.

    Built once per run (it samples the untrained grid column with the base sampler); each call evaluates
    the policy with :func:`evaluate_guidance`, logs the metrics at ``samples_seen``, writes
    ``<run_dir>/samples/eval_<samples_seen>.png`` (untrained vs now, on ``num_grid_prompts`` prompts spread
    over the set) and logs it with the headline metrics as its caption.
    """

    def __init__(
        self,
        backbone: Backbone,
        reward: nn.Module,
        prompts: list[str],
        run_dir: str | Path,
        *,
        num_grid_prompts: int = 8,
        samples_per_prompt: int = 2,
        seed: int = 0,
        guidance_scale: GuidanceScale = 1.0,
        num_steps: int | None = None,
        monitor: RewardMonitor | None = None,
    ) -> None:
        self.backbone, self.reward, self.prompts, self.run_dir = backbone, reward, list(prompts), Path(run_dir)
        self.monitor = monitor
        self.samples_per_prompt, self.seed = samples_per_prompt, seed
        self.guidance_scale, self.num_steps = guidance_scale, num_steps
        n = len(self.prompts)
        self.grid_prompts = [self.prompts[i * n // num_grid_prompts] for i in range(num_grid_prompts)]
        self.base_grid = sample_prompts(backbone, self.grid_prompts, samples_per_prompt=1,
                                        seed=seed + EVAL_SEED_OFFSET, num_steps=num_steps)[0]

    def __call__(self, policy: GuidanceFn | None, tracker: Any, samples_seen: int) -> dict[str, float]:
        from fluxguide.harness.grids import save_prompt_grid

        metrics, images = evaluate_guidance(self.backbone, self.reward, policy, self.prompts, seed=self.seed,
                                            samples_per_prompt=self.samples_per_prompt,
                                            guidance_scale=self.guidance_scale, num_steps=self.num_steps,
                                            monitor=self.monitor)
        tracker.log(metrics, samples_seen)
        index = {p: i * self.samples_per_prompt for i, p in enumerate(self.prompts)}
        columns = {"untrained": self.base_grid,
                   f"{samples_seen} samples": images[[index[p] for p in self.grid_prompts]]}
        path = save_prompt_grid(columns, self.grid_prompts, self.run_dir / "samples" / f"eval_{samples_seen:08d}.png",
                                root=self.run_dir)
        tracker.log_image("eval/samples", path, samples_seen, caption=", ".join(
            f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k in CAPTION_METRICS))
        return metrics


@torch.no_grad()
def verifier_scores(backbone: Backbone, prompts: list[str], *, samples_per_prompt: int, seed: int = 0,
                    num_steps: int | None = None, **sampler: Any) -> tuple[dict[str, float], torch.Tensor]:
    """The backbone's verifier on ``prompts`` sampled with the evaluation noise (``seed + EVAL_SEED_OFFSET``):
    ``pass_rate``, each attribute's accuracy and their mean ``attribute_mean``; and the images (prompt-major).

    The mean attribute accuracy moves with every attribute an image gets right; the pass rate (all at once)
    sits near the floor on a weak world. ``sampler``: ``cfg_scale``, ``guidance_model``, ``guidance_scale``.
    """
    if backbone.verifier is None:
        raise ValueError(f"{type(backbone).__name__} has no verifier: a pass-rate evaluation needs a backbone "
                         "with one (e.g. the shapes world)")
    images, all_prompts = sample_prompts(backbone, prompts, samples_per_prompt=samples_per_prompt,
                                         seed=seed + EVAL_SEED_OFFSET, num_steps=num_steps, batch_size=128, **sampler)
    result = backbone.verifier(images, all_prompts)
    scores = {k: float(v.mean()) for k, v in result.scores.items()}
    return {"pass_rate": result.accuracy, **scores, "attribute_mean": sum(scores.values()) / len(scores)}, images


class ReferenceEvaluator:
    """The verifier's pass rate of a policy against the base sampler's and CFG's on the same prompts and noise.

    Built once per run on the evaluating rank: unless ``references`` (from a resumed checkpoint) are given it
    scores the base sampler and CFG (``cfg_scale``) once; :attr:`references` is what a checkpoint keeps. Each
    call logs ``eval/verifier_pass_rate``, ``eval/verifier_<attribute>``, ``eval/verifier_attribute_mean``, the
    references ``eval/{base,cfg}_{pass_rate,attribute_mean}``, the fraction of CFG's gain over the base
    sampler the policy recovers ``eval/cfg_gain_recovered`` (and ``eval/cfg_attribute_gain_recovered``), plus
    ``extra()``'s metrics, ``monitor``'s rewards (:mod:`fluxguide.harness.monitoring`), and a sample grid (base | CFG | trained; a resumed run has the references' figures,
    not their images, so its grids show the policy only). ``score_references=False`` leaves the references out
    (a chain's distillation stage: the fine-tuning after it is what is compared).
    """

    def __init__(self, backbone: Backbone, prompts: list[str], run_dir: str | Path, *, cfg_scale: float,
                 samples_per_prompt: int = 4, seed: int = 0, num_steps: int | None = None,
                 guidance_scale: GuidanceScale = 1.0, num_grid_prompts: int = 8,
                 references: dict[str, float] | None = None, extra: Any = None,
                 monitor: RewardMonitor | None = None, score_references: bool = True) -> None:
        self.backbone, self.prompts, self.run_dir, self.monitor = backbone, list(prompts), Path(run_dir), monitor
        self.sampling = {"samples_per_prompt": samples_per_prompt, "seed": seed, "num_steps": num_steps}
        self.cfg_scale, self.guidance_scale, self.extra = cfg_scale, guidance_scale, extra
        n = len(self.prompts)
        self.grid_prompts = [self.prompts[i * n // num_grid_prompts] for i in range(num_grid_prompts)]
        self.grid_index = [self.prompts.index(p) * samples_per_prompt for p in self.grid_prompts]
        self.reference_images: dict[str, torch.Tensor] = {}
        self.references = references if score_references else {}
        if self.references is None:
            base, base_images = verifier_scores(backbone, self.prompts, **self.sampling)
            cfg, cfg_images = verifier_scores(backbone, self.prompts, cfg_scale=cfg_scale, **self.sampling)
            self.references = {"base": base["pass_rate"], "cfg": cfg["pass_rate"],
                               "base_attributes": base["attribute_mean"], "cfg_attributes": cfg["attribute_mean"]}
            self.reference_images = {"base": base_images[self.grid_index],
                                     f"CFG {cfg_scale:g}": cfg_images[self.grid_index]}
            print(f"held-out pass rate: base {base['pass_rate']:.3f}, CFG {cfg_scale:g} {cfg['pass_rate']:.3f}; "
                  f"attribute accuracy: base {base['attribute_mean']:.3f}, CFG {cfg['attribute_mean']:.3f}")

    def __call__(self, policy: GuidanceFn, tracker: Any, samples_seen: int) -> dict[str, float]:
        from fluxguide.harness.grids import save_prompt_grid

        ref = self.references
        was_training = isinstance(policy, nn.Module) and policy.training
        if isinstance(policy, nn.Module):
            policy.eval()
        metrics, images = verifier_scores(self.backbone, self.prompts, guidance_model=policy,
                                          guidance_scale=self.guidance_scale, **self.sampling)
        out = {f"eval/verifier_{k}": v for k, v in metrics.items()}
        out[IMAGES] = len(images)
        if self.monitor is not None:
            n = self.sampling["samples_per_prompt"]
            out.update(self.monitor(images, [p for p in self.prompts for _ in range(n)]))
        if ref:
            out.update({"eval/base_pass_rate": ref["base"], "eval/cfg_pass_rate": ref["cfg"],
                        "eval/base_attribute_mean": ref["base_attributes"],
                        "eval/cfg_attribute_mean": ref["cfg_attributes"]})
        for name, key, base, cfg in (("cfg_gain_recovered", "pass_rate", "base", "cfg"),
                                     ("cfg_attribute_gain_recovered", "attribute_mean", "base_attributes",
                                      "cfg_attributes")):
            if ref and ref[cfg] - ref[base] > 0:
                out[f"eval/{name}"] = (metrics[key] - ref[base]) / (ref[cfg] - ref[base])
        if self.extra is not None:
            out.update(self.extra())
        tracker.log(out, samples_seen)
        columns = {**self.reference_images, "trained": images[self.grid_index]}
        path = save_prompt_grid(columns, self.grid_prompts, self.run_dir / "samples" / f"eval_{samples_seen:09d}.png",
                                root=self.run_dir)
        tracker.log_image("eval/samples", path, samples_seen)
        if was_training:
            policy.train()
        return out
