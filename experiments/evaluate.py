"""Evaluate trained guidance policies against the base sampler, CFG and best-of-N on held-out prompts.

    python experiments/evaluate.py --policies runs/reward_gradient/shapes runs/ppo/shapes
    python experiments/evaluate.py --policies runs/bc/cfg_distillation/guidance.safetensors --best-of 2 4 8
    python experiments/evaluate.py --policies runs/reward_gradient/shapes-4-step --pareto-steps 1 2 4 8 20

The prompts and every policy are checked against the base model first (prompts it can render; each policy's
network sizes and the backbone fingerprint its run recorded), before any row is sampled.
Every sampler sees the same held-out prompts and the same noise (paired comparison). Rows: the base sampler,
classifier-free guidance, best-of-N of the base sampler picked by the training reward (``--pick-reward``),
and each policy; each row reports its base-model calls per image and wall time per image, the verifier's
pass rate with its 90% interval (``pass_rate``, ``pass_rate_lo``, ``pass_rate_hi``; bootstrap over prompts) and
attribute accuracies, its gain over the base sampler with a paired-bootstrap 90% interval on the same noise
(``gain_vs_base``, ``gain_lo``, ``gain_hi``), each policy's difference to CFG the same way (``gain_vs_cfg``,
``vs_cfg_lo``, ``vs_cfg_hi``), and the mean of every reward. A progress bar runs over the samplers, with one line
per finished sampler; then the table and two verdicts per policy, against the base sampler and against CFG
("above base" when the lower end of the interval is above zero). Each policy samples at the step count its run
trained it at (``--policy-steps`` overrides); ``--pareto-steps`` adds the base sampler, CFG and best-of-N at other
step counts on the same noise and plots pass rate against model calls per image (``pareto.png``). Writes
``<out_dir>/evaluation.md``, ``evaluation.csv`` and ``samples.png`` (a grid of the first sample of a few prompts per
sampler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxguide.backbones.base import Backbone
from fluxguide.backbones.prompt_check import check_backbone_prompts
from fluxguide.backbones.registry import build_backbone, build_reward
from fluxguide.checkpointing import latest_checkpoint, read_manifest
from fluxguide.data.store import MANIFEST, GuidanceDataset
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness.cli import cli
from fluxguide.harness.config import (
    ConfigError,
    check_device,
    check_float,
    check_int,
    check_no_duplicates,
    check_writable_dir,
    validate,
)
from fluxguide.harness.evaluation import SamplerSpec, compare_samplers, recommended_cfg_scale, write_table
from fluxguide.harness.grids import save_prompt_grid
from fluxguide.harness.pareto import plot_pareto, sweep_specs
from fluxguide.harness.statistics import gain_verdict
from fluxguide.policies import load_guidance_model
from fluxguide.policies.registry import check_fits_backbone
from fluxguide.provenance import backbone_fingerprint, check_fingerprint


@dataclass
class Config:
    policies: tuple[Path, ...] = ()
    """trained policies: guidance.safetensors files, or run folders holding one"""
    names: tuple[str, ...] = ()
    """row labels of the policies (default: the run folder's parent/name, e.g. 'ppo/shapes')"""
    out_dir: Path = Path("outputs/evaluate")
    """where evaluation.md / .csv and samples.png are written"""
    backbone: str = "shapes"
    """the base model: a backbone name ('shapes', 'shapes-random', ...) or a spec 'package.module:factory'"""
    weights_dir: Path | None = None
    """shapes-world weight folder (default: the weights shipped in the package)"""
    rewards: tuple[str, ...] = ("shapes-clip", "shapes-aesthetic", "verifier")
    """rewards every kept image is scored with (fluxguide.rewards.make_reward names)"""
    pick_reward: str = "shapes-clip"
    """the training reward that picks the best of N candidates"""
    best_of: tuple[int, ...] = (2, 4, 8)
    """best-of-N rows of the base sampler"""
    cfg_scale: float | None = None
    """classifier-free guidance scale of the CFG row (default: the backbone's recommended one; 3 on the shapes
    world)"""
    guidance_scale: float = 1.0
    """scale of the policies' corrections"""
    num_steps: int | None = None
    """sampling steps of the base, CFG and best-of-N rows (default: the world's)"""
    policy_steps: tuple[int, ...] = ()
    """sampling steps of each policy, one per --policies entry (default: the steps its run trained it at, read
    from the run folder's checkpoint, else --num-steps): a 4-step policy is evaluated at 4 steps"""
    pareto_steps: tuple[int, ...] = ()
    """also sample the base sampler and CFG at each of these step counts (and best-of-N where it costs no more
    calls than CFG at --num-steps), on the same noise, and draw pass rate against model calls per image into
    <out_dir>/pareto.png (e.g. 1 2 4 8 20)"""
    prompts: str = "shapes-heldout"
    """the prompt set: 'shapes-heldout' (the 90 held-out prompts), 'shapes-train' (training prompts, e.g. to choose
    a guidance scale without looking at the held-out set) or a text file with one prompt per line"""
    num_prompts: int | None = None
    """evaluate on the first N prompts of the set (default: all)"""
    samples_per_prompt: int = 4
    """images per held-out prompt"""
    grid_prompts: int = 8
    """held-out prompts in the sample grid"""
    seed: int = 0
    """noise seed (every sampler sees the same noise)"""
    threads: int = field(default_factory=lambda: min(2, torch.get_num_threads()))
    """torch CPU threads"""
    device: str = "cpu"
    """torch device"""

    def validate(self) -> None:
        """Refuse bad values before anything is loaded or sampled (:class:`ConfigError` naming the flag)."""
        check_int("num_steps", self.num_steps, optional=True)
        check_int("num_prompts", self.num_prompts, optional=True)
        check_int("samples_per_prompt", self.samples_per_prompt)
        check_int("grid_prompts", self.grid_prompts, minimum=0)
        check_int("threads", self.threads)
        for n in self.best_of:
            check_int("best_of", n)
        for n in self.policy_steps:
            check_int("policy_steps", n)
        for n in self.pareto_steps:
            check_int("pareto_steps", n)
        check_no_duplicates("pareto_steps", self.pareto_steps)
        if self.policy_steps and len(self.policy_steps) != len(self.policies):
            raise ConfigError(f"--policy-steps has {len(self.policy_steps)} step counts for {len(self.policies)} "
                              "policies: give one per policy, or none to use the steps each was trained at")
        check_float("cfg_scale", self.cfg_scale, optional=True)
        check_float("guidance_scale", self.guidance_scale, minimum=-math.inf)
        check_no_duplicates("rewards", self.rewards)
        check_no_duplicates("best_of", self.best_of)
        check_no_duplicates("names", self.names)
        if self.names and len(self.names) != len(self.policies):
            raise ConfigError(f"--names has {len(self.names)} labels for {len(self.policies)} policies: give one "
                              "label per policy")
        for path in self.policies:
            policy_file(path)
        check_device("device", self.device)
        check_writable_dir("out_dir", self.out_dir)


def policy_file(path: Path) -> Path:
    """``path`` itself, or the ``guidance.safetensors`` inside a run folder."""
    file = path / "guidance.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--policies {path}: no saved policy at {file}: pass a guidance.safetensors or a finished "
                          "run folder")
    return file


def load_policies(cfg: Config, world: Backbone) -> list[SamplerSpec]:
    """One sampler row per ``--policies`` entry, each loaded and checked against the base model before anything
    is sampled: the backbone fingerprint its run recorded (a run folder's latest checkpoint) and its network's
    observation sizes. Otherwise every reference row would be sampled before a policy's first call failed."""
    fingerprint = backbone_fingerprint(world)
    specs = []
    for i, path in enumerate(cfg.policies):
        file = policy_file(path)
        state = recorded_state(file)
        check_fingerprint(state.get("backbone_fingerprint"), fingerprint, made=f"the policy {file} was trained", fix=(
            "its corrections are for that model's predictions. Evaluate it with the base model it was trained "
            "on (the same --backbone and --weights-dir), or leave it out of --policies"))
        policy = load_guidance_model(file, device=cfg.device)
        check_fits_backbone(policy, world, name=f"the policy {file}")
        name = cfg.names[i] if cfg.names else f"{file.parent.parent.name}/{file.parent.name}"
        steps = cfg.policy_steps[i] if cfg.policy_steps else trained_steps(state)
        specs.append(SamplerSpec(name, policy=policy, guidance_scale=cfg.guidance_scale,
                                 num_steps=steps if steps is not None else cfg.num_steps))
    return specs


def trained_steps(state: dict[str, Any]) -> int | None:
    """The sampling steps a run trained at: its ``--num-steps``, else (behaviour cloning) its dataset's; ``None``
    when neither is recorded."""
    config = state.get("config", {})
    if config.get("num_steps") is not None:
        return int(config["num_steps"])
    dataset = Path(str(config["dataset"])) if config.get("dataset") else None
    if dataset is not None and (dataset / MANIFEST).is_file():  # a dataset path relative to another folder: unknown
        steps = GuidanceDataset(dataset, verify=False).metadata.get("num_steps")
        return None if steps is None else int(steps)
    return None


def recorded_state(file: Path) -> dict[str, Any]:
    """The state the run that saved ``file`` (a run folder's ``guidance.safetensors``) recorded in its latest
    checkpoint (its ``backbone_fingerprint``, its ``config`` with the ``num_steps`` it trained at); empty for a file
    outside a run folder."""
    checkpoint = latest_checkpoint(file.parent)
    return {} if checkpoint is None else read_manifest(checkpoint).get("state", {})


def main(cfg: Config) -> list[dict]:
    validate(cfg)  # every option, and that out_dir is writable, before any model is loaded or sample drawn
    torch.set_num_threads(cfg.threads)
    world = build_backbone(cfg.backbone, weights_dir=cfg.weights_dir, device=cfg.device)
    held = resolve_prompts(cfg.prompts)[: cfg.num_prompts]
    check_backbone_prompts(world, held, where=f"--prompts {cfg.prompts}", source=cfg.prompts)  # before any sampling
    policies = load_policies(cfg, world)  # all of them, checked against the world before any row is sampled
    cfg_scale = cfg.cfg_scale if cfg.cfg_scale is not None else recommended_cfg_scale(world)
    rewards = {name: build_reward(name, world) for name in dict.fromkeys((*cfg.rewards, cfg.pick_reward))}
    cfg_row = SamplerSpec(f"CFG {cfg_scale:g}", cfg_scale=cfg_scale)  # every policy is paired with it too
    specs = [SamplerSpec("base"), cfg_row]
    specs += [SamplerSpec(f"best-of-{n} ({cfg.pick_reward})", best_of=n) for n in cfg.best_of]
    default_steps = len(world.schedule(cfg.num_steps)) - 1
    specs += sweep_specs(cfg.pareto_steps, default_steps, cfg_scale=cfg_scale, best_of=cfg.best_of,
                         pick_reward=cfg.pick_reward)
    specs += policies
    rows, images = compare_samplers(world, specs, held, rewards, pick_reward=cfg.pick_reward,
                                    samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed,
                                    num_steps=cfg.num_steps, progress=True, cfg_reference=cfg_row.name)
    md, csv = write_table(rows, cfg.out_dir / "evaluation")
    if cfg.pareto_steps:
        pareto = plot_pareto(rows, [spec.name for spec in policies], cfg.out_dir / "pareto.png", reference=cfg_row.name)
        print(f"wrote {pareto}")
    grid = [held[i * len(held) // cfg.grid_prompts] for i in range(min(cfg.grid_prompts, len(held)))]
    index = [held.index(p) * cfg.samples_per_prompt for p in grid]
    png = save_prompt_grid({name: imgs[index] for name, imgs in images.items()}, grid, cfg.out_dir / "samples.png")
    print(md.read_text())
    for line in summary(rows, policies=[spec.name for spec in specs if spec.policy is not None]):
        print(line)
    print(f"wrote {md}, {csv} and {png}")
    return rows


#: Held-out images below which a table's intervals are too wide to tell a few points apart (the issue's bar).
MIN_IMAGES = 360


def summary(rows: list[dict[str, Any]], policies: list[str]) -> list[str]:
    """One verdict line per policy row (its gain over the base sampler and whether the 90% interval clears zero),
    and a note when the table holds fewer than :data:`MIN_IMAGES` images per sampler."""
    lines = [gain_verdict(row["sampler"], row["gain_vs_base"], row["gain_lo"], row["gain_hi"])
             for row in rows if row["sampler"] in policies and "gain_vs_base" in row]
    cfg = next((row["sampler"] for row in rows if row["sampler"].startswith("CFG")), "CFG")
    lines += [gain_verdict(row["sampler"], row["gain_vs_cfg"], row["vs_cfg_lo"], row["vs_cfg_hi"], reference=cfg)
              for row in rows if row["sampler"] in policies and "gain_vs_cfg" in row]
    images = min((row["images"] for row in rows if "images" in row), default=None)
    if images is not None and images < MIN_IMAGES:
        lines.append(f"note: {images} held-out images per sampler: 90% intervals at this size are wide; "
                     f"{MIN_IMAGES} or more (e.g. 90 prompts x 4 images) tell a few points apart")
    return lines


if __name__ == "__main__":
    cli(main, Config)
