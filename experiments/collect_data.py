"""Collect behaviour-cloning data: sample trajectories, pair each visited state with a target correction.

    python experiments/collect_data.py                                          # CFG distillation, shapes world
    python experiments/collect_data.py --strategy best-of-n --out-dir runs/bc_data/best_of_n
    python experiments/collect_data.py --strategy policy-distillation --teacher runs/chain/rl/guidance.safetensors \
        --coarse-steps 4 --out-dir runs/bc_data/4_step_from_policy           # a trained policy, into 4 steps
    python experiments/collect_data.py --help                                   # every option

Prompts are the shapes world's *training* prompts (``--episodes`` of them, shuffled with the seed); every
batch of ``--batch-size`` prompts is sampled with the chosen target strategy (``fluxguide.data.targets``)
and appended to the dataset folder ``--out-dir`` as one atomic chunk. The dataset is its own checkpoint:
rerunning the same command skips the batches already on disk, so a killed collection finishes where it
stopped and loses at most the batch in flight. Metrics (episodes kept, rewards, seconds per batch) go to W&B
(offline unless ``--wandb-mode online``) and ``<out-dir>/run_seed<seed>/metrics.jsonl``, against the number of
trajectories sampled.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from fluxguide.backbones.base import Backbone
from fluxguide.backbones.calls import MODEL_CALLS
from fluxguide.backbones.prompt_check import check_backbone_prompts
from fluxguide.backbones.registry import build_reward
from fluxguide.data.coarse import substeps
from fluxguide.data.collector import GuidanceDataCollector
from fluxguide.data.episodes import REWARD
from fluxguide.data.store import MANIFEST, GuidanceDataset, check_collection_settings
from fluxguide.data.targets import (
    BestOfN,
    CFGDistillation,
    PolicyDistillation,
    ReferenceImage,
    RewardGradientTargets,
    TargetStrategy,
)
from fluxguide.envs.prompts import resolve_prompts
from fluxguide.harness import BackboneConfig, Flat
from fluxguide.harness.cli import INTERRUPTED_MESSAGE, cli
from fluxguide.harness.config import (
    ConfigError,
    check_device,
    check_float,
    check_int,
    check_writable_dir,
    validate,
)
from fluxguide.harness.evaluation import recommended_cfg_scale
from fluxguide.harness.presets import FLUX_DEV_REWARD, FLUX_DEV_STEPS, flux_dev_model
from fluxguide.harness.progress import write_progress
from fluxguide.harness.tracking import Tracker, resolve_wandb_mode
from fluxguide.locking import FolderLock
from fluxguide.policies import load_guidance_model
from fluxguide.policies.registry import check_fits_backbone
from fluxguide.serialization import refuse_links

#: The shapes preset's dataset: CFG 3's corrections on this many training-prompt trajectories ...
BC_EPISODES = 512
#: ... each also labelled under this many other prompts of its batch (the default of --prompt-swaps).
PROMPT_SWAPS = 1

Strategy = Literal["cfg-distillation", "policy-distillation", "reward-gradient", "best-of-n", "reference-image"]
#: The strategies that distil a teacher's corrections (fluxguide.data.distillation.Distillation): prompt swaps and coarse
#: steps apply to them.
DISTILLATION = ("cfg-distillation", "policy-distillation")


@dataclass
class Config:
    """Collect a behaviour-cloning dataset; the defaults are the shapes preset (CFG distillation)."""

    preset: str = "shapes"
    """the recipe whose values are the defaults, set by --preset: 'shapes' or 'flux-dev' (listed in --help)"""
    out_dir: Path = Path("runs/bc_data/cfg_distillation")
    """the dataset folder (created, or appended to; rerunning resumes)"""
    strategy: Strategy = "cfg-distillation"
    """where the targets come from (fluxguide.data.targets.TARGET_STRATEGIES)"""
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
    train_prompts: str = "shapes-train"
    """the prompts to collect on: a text file with one prompt per line, a named set, or a spec"""
    episodes: int = BC_EPISODES
    """prompts to sample (training prompts, cycled and shuffled with the seed); best-of-N samples n per prompt"""
    batch_size: int = 64
    """prompts per batch; each batch is appended as one chunk"""
    num_steps: int = 20
    """sampling steps of the collection (with --coarse-steps: the teacher's, a multiple of them)"""
    coarse_steps: int | None = None
    """cfg- / policy-distillation: distil for a sampler of this many steps (few-step guidance): the teacher samples at
    --num-steps and each coarse step's target is the correction with which one Euler step lands where the teacher's
    --num-steps / K fine steps land (fluxguide.data.coarse); the dataset then trains a K-step policy"""
    teacher: Path | None = None
    """policy-distillation: the trained policy whose corrections are the targets (a guidance.safetensors, e.g. the
    20-step fine-tuned network of the reward-gradient-distilled chain), sampled at --num-steps: collect at the steps
    it was trained at"""
    cfg_scale: float | None = None
    """CFG scale of cfg-distillation (default: the backbone's recommended_cfg_scale, 3 in the shapes world)"""
    student_checkpoint: Path | None = None
    """cfg-distillation: a trained policy (train_bc.py's guidance.safetensors) that drives the sampler while CFG
    labels the states (a DAgger round; append to the teacher's dataset with another --seed)"""
    prompt_swaps: int | None = None
    """cfg- / policy-distillation: also label each sampled trajectory's states under this many other training
    prompts of its batch (the teacher's correction for the new prompt at the same latents; +2 model calls per step
    per swap with CFG, +1 with a policy), so the student sees the words of a prompt next to images drawn for other
    prompts. Default: 1 with a distillation (the shapes recipe: +12 held-out points over no swaps at the same
    budget, docs/results.md), 0 otherwise"""
    reward: str = "verifier"
    """reward registry name for best-of-n (any reward) and reward-gradient (differentiable, e.g. shapes-clip),
    built for the backbone as every script builds it; e.g. 'verifier-attributes': the backbone's verifier's mean
    per-attribute score (count, colour, kind, position), a graded ranking where few samples pass outright"""
    step_size: float = 1.0
    """reward-gradient: the teacher's step size"""
    normalize: bool = True
    """reward-gradient: rescale each sample's reward gradient to unit RMS"""
    n: int = 8
    """best-of-n: trajectories per prompt"""
    top_k: int = 1
    """best-of-n: trajectories kept per prompt"""
    noise_level: float = 0.7
    """best-of-n: SDE noise level a (Flow-GRPO); 0 draws ODE samples from different noise"""
    bon_target: Literal["renoise", "endpoint", "step"] = "renoise"
    """best-of-n: target of the kept trajectories (see fluxguide.data.targets.BestOfN)"""
    renoise_samples: int = 1
    """best-of-n with the renoise target: independent re-noisings of each kept image per schedule time"""
    min_reward: float | None = None
    """best-of-n: drop kept trajectories below this reward (1 with the verifier: only passing samples)"""
    strength: float = 1.0
    """reference-image: fraction of the way to the reference velocity"""
    guide: bool = True
    """reward-gradient / reference-image: visit the teacher-guided sampler's states (else the base sampler's)"""
    seed: int = 0
    """seed of the prompt order and the noise"""
    backbone_seed: int | None = None
    """seed of the randomly initialised world of --backbone shapes-random (default: --seed); a DAgger round
    under another --seed passes the first round's here, since a dataset holds one base model's states"""
    threads: int = 1
    """torch CPU threads (1 is fastest on a shared 2-core machine)"""
    device: str = "cpu"
    """torch device"""
    wandb_project: str = "fluxguide"
    """W&B project"""
    wandb_group: str = "collect"
    """W&B group"""
    wandb_mode: str | None = None
    """'online', 'offline' or 'disabled' (default: $WANDB_MODE, else offline)"""

    def validate(self) -> None:
        """Refuse bad values before anything is loaded (:class:`ConfigError` naming the flag)."""
        for name in ("episodes", "batch_size", "num_steps", "n", "top_k", "renoise_samples", "threads"):
            check_int(name, getattr(self, name))
        check_int("prompt_swaps", self.prompt_swaps, minimum=0, optional=True)
        check_int("coarse_steps", self.coarse_steps, optional=True)
        if self.coarse_steps is not None and self.strategy not in DISTILLATION:
            raise ConfigError(f"--coarse-steps distils a teacher's displacements: it needs --strategy cfg-distillation "
                              f"or policy-distillation, got --strategy {self.strategy} (drop --coarse-steps)")
        if (self.strategy == "policy-distillation") != (self.teacher is not None):
            raise ConfigError("--strategy policy-distillation distils the policy --teacher: give both or neither (got "
                              f"--strategy {self.strategy} and --teacher {self.teacher})")
        if self.teacher is not None and not self.teacher.is_file():
            raise ConfigError(f"--teacher {self.teacher}: no such file (pass a trained guidance.safetensors)")
        if self.coarse_steps is not None:
            try:
                substeps(self.num_steps, self.coarse_steps)
            except ValueError as e:
                raise ConfigError(f"--num-steps {self.num_steps} / --coarse-steps {self.coarse_steps}: {e}") from None
        if self.top_k > self.n:
            raise ConfigError(f"--top-k {self.top_k} keeps more trajectories than --n {self.n} draws: use --top-k <= --n")
        check_float("cfg_scale", self.cfg_scale, optional=True)
        check_float("step_size", self.step_size)
        check_float("noise_level", self.noise_level, strict=False)
        check_float("strength", self.strength)
        check_float("min_reward", self.min_reward, minimum=-math.inf, optional=True)
        if self.student_checkpoint is not None and not self.student_checkpoint.is_file():
            raise ConfigError(f"--student-checkpoint {self.student_checkpoint}: no such file (pass a "
                              "guidance.safetensors)")
        try:
            resolve_wandb_mode(self.wandb_mode)
        except ValueError as e:
            raise ConfigError(f"--wandb-mode: {e}") from None
        check_device("device", self.device)
        check_writable_dir("out_dir", self.out_dir)


def flux_dev() -> Config:
    """FLUX.1-dev on one GPU (not measured here): CFG distillation on the animal prompts at 28 steps."""
    return Config(preset="flux-dev", out_dir=Path("runs/bc_data/flux-dev"), model=flux_dev_model(),
                  train_prompts=FLUX_DEV_REWARD["train_prompts"], episodes=256, batch_size=4,
                  num_steps=FLUX_DEV_STEPS, device="cuda")


PRESETS = {"shapes": Config, "flux-dev": flux_dev}


def build_strategy(cfg: Config, world: Backbone) -> TargetStrategy:
    if cfg.prompt_swaps and cfg.strategy not in DISTILLATION:
        raise ValueError(f"--prompt-swaps relabels states with a teacher's correction: it needs --strategy "
                         f"cfg-distillation or policy-distillation, got --strategy {cfg.strategy} (drop --prompt-swaps)")
    swaps = PROMPT_SWAPS if cfg.prompt_swaps is None else cfg.prompt_swaps
    if cfg.strategy == "cfg-distillation":
        scale = cfg.cfg_scale if cfg.cfg_scale is not None else recommended_cfg_scale(world)
        student = None
        if cfg.student_checkpoint is not None:
            student = load_guidance_model(cfg.student_checkpoint, device=cfg.device).eval()
        return CFGDistillation(scale, student=student, prompt_swaps=swaps, coarse_steps=cfg.coarse_steps)
    if cfg.strategy == "policy-distillation":
        assert cfg.teacher is not None  # validate() checked it
        teacher = load_guidance_model(cfg.teacher, device=cfg.device)
        check_fits_backbone(teacher, world, name=f"--teacher {cfg.teacher}")
        return PolicyDistillation(teacher, source=str(cfg.teacher), prompt_swaps=swaps, coarse_steps=cfg.coarse_steps)
    reward = build_reward(cfg.reward, world)
    if cfg.strategy == "reward-gradient":
        return RewardGradientTargets(reward, step_size=cfg.step_size, normalize=cfg.normalize, guide=cfg.guide)
    if cfg.strategy == "best-of-n":
        return BestOfN(reward, n=cfg.n, top_k=cfg.top_k, noise_level=cfg.noise_level, target=cfg.bon_target,
                       min_reward=cfg.min_reward, renoise_samples=cfg.renoise_samples)
    # A world that renders a correct scene for any prompt (the shapes world) gives the reference images.
    return ReferenceImage(world.render_references, strength=cfg.strength, guide=cfg.guide)


def episode_prompts(cfg: Config, backbone: Backbone) -> list[str]:
    """``cfg.episodes`` training prompts: the training set cycled, each cycle shuffled with the seed. The set is
    refused first if ``backbone`` cannot render one of its prompts (a ``PromptError`` naming --train-prompts)."""
    train = resolve_prompts(cfg.train_prompts)
    check_backbone_prompts(backbone, train, where=f"--train-prompts {cfg.train_prompts}", source=cfg.train_prompts)
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    while len(order) < cfg.episodes:
        order += torch.randperm(len(train), generator=g).tolist()
    return [train[i] for i in order[: cfg.episodes]]


class CollectionProgress:
    """What a Ctrl-C during a collection reports: what the dataset folder keeps, and how much of it this run wrote
    (:func:`main` calls :meth:`opened` once it has opened the dataset)."""

    def __init__(self) -> None:
        self.out_dir: Path | None = None
        self.found = (0, 0)  # (episodes, chunks) in the dataset when this run opened it

    def opened(self, dataset: GuidanceDataset) -> None:
        self.out_dir, self.found = dataset.path, (dataset.num_episodes, dataset.num_chunks)

    def interrupted(self) -> str:
        """The message, from the chunks the dataset's manifest lists now: exactly what a rerun keeps."""
        if self.out_dir is None:
            return INTERRUPTED_MESSAGE
        chunks = json.loads((self.out_dir / MANIFEST).read_text())["chunks"]
        episodes = sum(c["num_episodes"] for c in chunks)
        new_episodes, new_chunks = episodes - self.found[0], len(chunks) - self.found[1]
        kept = f"the dataset at {self.out_dir} keeps {episodes} episodes in {len(chunks)} chunks"
        if new_chunks == 0:
            said = f"nothing new was written; {kept}"
        elif new_chunks == len(chunks):
            said = f"{kept}, all written by this run"
        else:
            said = f"{kept}, of which this run wrote {new_episodes} episodes in {new_chunks} chunks"
        return f"interrupted: {said}; a batch being sampled is not kept: rerun the same command to collect the rest"


def main(cfg: Config, progress: CollectionProgress | None = None) -> GuidanceDataset:
    validate(cfg)  # every option, before anything is loaded
    lock = FolderLock(cfg.out_dir, "dataset folder").acquire()  # one collection at a time per dataset folder
    metrics_dir = cfg.out_dir / f"run_seed{cfg.seed}"
    refuse_links(metrics_dir, root=cfg.out_dir)  # a planted link would take the metrics log elsewhere
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    backbone_seed = cfg.seed if cfg.backbone_seed is None else cfg.backbone_seed
    world = cfg.model.build(seed=backbone_seed, device=cfg.device)
    prompts = episode_prompts(cfg, world)  # before any model runs: prompts the world cannot render are refused
    collector = GuidanceDataCollector(world, build_strategy(cfg, world), num_steps=cfg.num_steps)
    dataset = GuidanceDataset.create(cfg.out_dir, collector.metadata())
    if progress is not None:
        progress.opened(dataset)
    # A batch index means these prompts only under the same batch size and prompt set: refuse a rerun that
    # would mix them up (and silently keep half the episodes).
    settings = {"batch_size": cfg.batch_size, "train_prompts": cfg.train_prompts}
    check_collection_settings(dataset, cfg.seed, settings)
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    done = {m.get("batch_index") for m in dataset.chunk_metadata if m.get("seed") == cfg.seed}
    per_prompt = cfg.n if cfg.strategy == "best-of-n" else 1
    sampled = sum(len(batches[i]) * per_prompt for i in done if i is not None and i < len(batches))
    # Base-model calls of this seed's batches (backbones/calls.py), kept in each chunk's metadata across resumes.
    calls = sum(m.get("model_calls", 0) for m in dataset.chunk_metadata if m.get("seed") == cfg.seed)
    if done:
        print(f"resuming: {dataset.num_episodes} episodes in {dataset.num_chunks} chunks already in {cfg.out_dir}")
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    # One metrics log per seed: a DAgger round (another seed) appending to the dataset keeps the first's log.
    tracker = Tracker(metrics_dir, config=config_dict, project=cfg.wandb_project,
                      group=cfg.wandb_group, mode=cfg.wandb_mode, resume_samples_seen=sampled if done else None,
                      tags=("collect", cfg.strategy, cfg.reward, cfg.model.backbone))

    bar = tqdm(enumerate(batches), total=len(batches), desc=f"collect {cfg.strategy}")
    for batch_index, batch_prompts in bar:
        if batch_index in done:
            continue
        t0, calls_before = time.perf_counter(), MODEL_CALLS.cost("train")
        with MODEL_CALLS.phase("train"):
            chunk = collector.collect(batch_prompts, seed=cfg.seed, batch_index=batch_index)
        batch_calls = MODEL_CALLS.cost("train") - calls_before
        calls += batch_calls
        chunk.metadata.update(settings, model_calls=batch_calls)
        if chunk.num_episodes:
            dataset.append(chunk)
        sampled += len(batch_prompts) * per_prompt
        metrics = {
            "train/episodes_kept": chunk.num_episodes,
            "train/dataset_episodes": dataset.num_episodes,
            "perf/seconds_per_batch": time.perf_counter() - t0,
            "perf/model_calls": calls,
        }
        if REWARD in chunk.episodes and chunk.num_episodes:
            metrics["train/kept_reward_mean"] = float(chunk.episodes[REWARD].mean())
        tracker.log(metrics, sampled)
        write_progress(metrics_dir, stage="collect", done=batch_index + 1, total=len(batches), unit="batches")
        bar.set_postfix(episodes=dataset.num_episodes)
    tracker.finish()
    lock.release()
    print(f"{cfg.out_dir}: {dataset.num_episodes} episodes, {dataset.num_transitions} transitions in "
          f"{dataset.num_chunks} chunks ({cfg.strategy}; {sampled} trajectories sampled)")
    return dataset


if __name__ == "__main__":
    progress = CollectionProgress()
    cli(lambda cfg: main(cfg, progress), Config, presets=PRESETS, interrupted=progress.interrupted)
