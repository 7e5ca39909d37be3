"""Train a guidance policy by behaviour cloning on a dataset written by ``experiments/collect_data.py``.

    python experiments/collect_data.py --out-dir runs/bc_data/cfg_distillation      # collect first
    python experiments/train_bc.py --dataset runs/bc_data/cfg_distillation          # then clone it
    python experiments/train_bc.py --help                                           # every option

A DAgger round (Ross et al. 2011): let the trained policy drive the sampler while CFG labels its states, append
those pairs to the dataset, and continue from the policy::

    python experiments/collect_data.py --out-dir runs/bc_data/cfg_distillation --seed 1 --episodes 512 \
        --student-checkpoint runs/bc/cfg_distillation/guidance.safetensors
    python experiments/train_bc.py --dataset runs/bc_data/cfg_distillation --run-dir runs/bc/cfg_dagger \
        --init-policy runs/bc/cfg_distillation/guidance.safetensors

The dataset is loaded (all its appended chunks) into a TorchRL replay buffer; each update samples a batch of
(observation, target correction) pairs and takes one optimizer step on the BC loss (MSE or Gaussian
log-likelihood, ``fluxguide.algos.bc``). Every ``eval_every`` updates the policy samples the shapes world's
*held-out* prompts with fixed noise, at one base-model call per step, and the exact verifier scores them; the
base sampler and CFG are scored once with the same noise, so ``eval/verifier_pass_rate`` can be read against
``eval/base_pass_rate`` and ``eval/cfg_pass_rate`` (``eval/cfg_gain_recovered`` is the fraction of CFG's gain
over the base sampler that the policy recovers; ``eval/cfg_attribute_gain_recovered`` the same for the mean
per-attribute accuracy, ``eval/verifier_attribute_mean``). Metrics go to W&B (offline unless
``--wandb-mode online``) and ``<run_dir>/metrics.jsonl``, against the number of training pairs seen.

Checkpoints are written every ``checkpoint_every`` updates; rerunning the same command resumes from the last
one. The final policy is saved to ``<run_dir>/guidance.safetensors`` (``fluxguide.policies.load_guidance_model``
opens it; ``experiments/main.py --guidance-checkpoint`` samples with it).

Under ``torchrun`` every process samples its own pairs (``--batch-size`` per process) and the gradients are
averaged over processes; rank 0 evaluates, logs the gathered metrics and writes the files (docs/distributed.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from fluxguide import distributed
from fluxguide.algos.bc import BCLoss, bc_evaluate, bc_update, check_dataset_matches_policy
from fluxguide.data.collection import GuidanceDataset
from fluxguide.backbones.registry import build_backbone
from fluxguide.worlds.shapes import ShapesWorld, heldout_prompts, verify
from fluxguide.worlds.shapes.evaluation import sample_prompts
from fluxguide.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from fluxguide.harness.grids import save_prompt_grid
from fluxguide.policies import (
    load_guidance_model,
    save_guidance_model,
)
from fluxguide.policies.registry import PolicyName, build_policy
from fluxguide.provenance import backbone_fingerprint, check_resume_fingerprint
from fluxguide.harness.tracking import Tracker


@dataclass
class Config:
    dataset: Path = Path("runs/bc_data/cfg_distillation")
    """the dataset folder written by experiments/collect_data.py"""
    run_dir: Path = Path("runs/bc/cfg_distillation")
    """run folder (checkpoints, metrics.jsonl, sample grids, W&B files, guidance.safetensors); rerunning resumes"""
    backbone: Literal["shapes", "shapes-random"] = "shapes"
    """the world to evaluate in (must be the one the dataset was collected with)"""
    weights_dir: Path | None = None
    """folder of the shapes world's weights (default: the ones shipped in the package)"""
    init_policy: Path | None = None
    """start from this saved policy (e.g. a previous run's guidance.safetensors, for a DAgger round); its
    architecture replaces --policy / --hidden-dim / ..."""
    policy: PolicyName = "attention"
    """guidance architecture (attention sees every token and the text tokens, as CFG's difference needs)"""
    hidden_dim: int = 64
    """policy width"""
    num_layers: int = 2
    """policy depth (MLP layers / transformer blocks / conv blocks)"""
    num_heads: int = 4
    """attention heads (attention policy)"""
    text_conditioning: bool = True
    """attention policy: read the text tokens and pooled embedding; --no-text-conditioning builds a text-blind
    student (img, pred and t only), which is all CFG's correction (w - 1) * (pred - pred_uncond(img, t)) needs"""
    loss: Literal["mse", "gaussian_nll"] = "mse"
    """BC loss"""
    lr: float = 1e-3
    """AdamW peak learning rate"""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """learning-rate schedule over total_updates (after a linear warm-up of warmup_updates)"""
    warmup_updates: int = 50
    """linear warm-up updates"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    batch_size: int = 128
    """training pairs per update"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (None: no clipping)"""
    total_updates: int = 2000
    """optimizer updates of the whole run (a resumed run counts the updates already done)"""
    time_budget_minutes: float | None = None
    """stop (with a checkpoint) after this much wall time, evaluation included, summed over resumes"""
    storage: Literal["memory", "memmap"] = "memory"
    """replay-buffer storage: in memory, or memory-mapped in <run_dir>/replay (datasets larger than RAM)"""
    guidance_scale: float = 1.0
    """scale of the policy's correction at evaluation"""
    num_steps: int | None = None
    """sampling steps at evaluation (default: the dataset's)"""
    eval_every: int = 250
    """evaluate every N updates (and at the start and the end)"""
    eval_num_prompts: int | None = None
    """evaluate on the first N held-out prompts (default: all 90)"""
    eval_samples_per_prompt: int = 4
    """samples per held-out prompt (same noise every evaluation and for the base / CFG references)"""
    cfg_scale: float | None = None
    """CFG scale of the reference evaluation (default: the dataset's, else ShapesWorld.recommended_cfg_scale)"""
    grid_prompts: int = 8
    """held-out prompts in each sample grid"""
    checkpoint_every: int = 250
    """write a checkpoint every N updates (and at the end)"""
    seed: int = 0
    """seed of the policy initialisation, batch sampling and evaluation noise"""
    threads: int = 1
    """torch CPU threads (1 is fastest on a shared 2-core machine)"""
    device: str = "cpu"
    """torch device"""
    wandb_project: str = "fluxguide"
    """W&B project"""
    wandb_group: str = "bc"
    """W&B group"""
    wandb_mode: str | None = None
    """'online', 'offline' or 'disabled' (default: $WANDB_MODE, else offline)"""


def learning_rate(cfg: Config, update: int) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at ``total_updates``."""
    if update < cfg.warmup_updates:
        return cfg.lr * (update + 1) / cfg.warmup_updates
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (update - cfg.warmup_updates) / max(1, cfg.total_updates - cfg.warmup_updates)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def pass_rate(cfg: Config, world: ShapesWorld, prompts: list[str], num_steps: int,
              **sampler: object) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out verifier pass rate (and per-attribute scores) with the evaluation noise; metrics and images."""
    images, all_prompts = sample_prompts(world, prompts, samples_per_prompt=cfg.eval_samples_per_prompt,
                                         seed=cfg.seed + 12345, num_steps=num_steps, batch_size=128, **sampler)
    result = verify(images, all_prompts)
    scores = {k: float(v.mean()) for k, v in result.scores.items()}
    # The mean attribute accuracy moves with every attribute an image gets right; the pass rate (all at once)
    # sits near the floor on a weak world.
    return {"pass_rate": result.accuracy, **scores, "attribute_mean": sum(scores.values()) / len(scores)}, images


def main(cfg: Config) -> dict[str, float]:
    device = distributed.init_distributed(cfg.device)  # this rank's device (a no-op without torchrun)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dataset = GuidanceDataset(cfg.dataset)
    world = build_backbone(cfg.backbone, weights_dir=cfg.weights_dir, seed=cfg.seed, device=device)
    meta = dataset.metadata
    num_steps = cfg.num_steps or int(meta.get("num_steps", world.default_num_steps))
    cfg_scale = cfg.cfg_scale or float(meta.get("cfg_scale", ShapesWorld.recommended_cfg_scale))
    if cfg.init_policy is not None:
        policy = load_guidance_model(cfg.init_policy, device=device)
    else:
        policy = build_policy(cfg.policy, world, hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, text_conditioning=cfg.text_conditioning)
    check_dataset_matches_policy(dataset, policy)
    loss_module = BCLoss(policy, loss_type=cfg.loss).to(device)
    distributed.reseed_rank_streams(cfg.seed)  # same init on every rank, then each rank's own stream
    trained = distributed.data_parallel(loss_module)  # DDP under torchrun: one forward, one backward per update
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed))  # each rank samples its own pairs
    scratch = cfg.run_dir / ("replay" if distributed.is_main() else f"replay-rank{distributed.rank()}")
    replay = dataset.replay_buffer(cfg.batch_size, storage=cfg.storage, scratch_dir=scratch,
                                   device=device, generator=data_gen)
    probe = dataset.sample(min(1024, len(dataset)), generator=torch.Generator().manual_seed(cfg.seed + 1))
    probe = probe.to(device)
    held = heldout_prompts()[: cfg.eval_num_prompts]
    grid_prompts = [held[i * len(held) // cfg.grid_prompts] for i in range(cfg.grid_prompts)]
    print(f"{cfg.dataset}: {dataset.num_episodes} episodes, {len(dataset)} pairs ({meta.get('strategy')}); "
          f"policy {type(policy).__name__} with {sum(p.numel() for p in policy.parameters()):,} parameters")

    # Resume from the last checkpoint of this run folder, if any.
    update, pairs_seen, elapsed, state = 0, 0, 0.0, {}
    fingerprint = backbone_fingerprint(world)  # stored in every checkpoint; a resume must match it
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is not None:
        main_rank = distributed.is_main()  # the RNG states saved are rank 0's; other ranks start fresh streams
        loaded = load_checkpoint(ckpt, modules={"loss": loss_module}, optimizers={"policy": optimizer},
                                 generators={"data": data_gen} if main_rank else {}, restore_global_rng=main_rank)
        check_resume_fingerprint(loaded.state.get("backbone_fingerprint"), fingerprint, ckpt)
        distributed.reseed_rank_streams(cfg.seed, data_gen, step=loaded.step)
        update, state = loaded.step, loaded.state
        pairs_seen, elapsed = state["pairs_seen"], state["elapsed_seconds"]
        print(f"resuming from {ckpt} (update {update}, {pairs_seen} pairs seen)")
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    tracker = Tracker(cfg.run_dir, config=config_dict, project=cfg.wandb_project, group=cfg.wandb_group,
                      mode=cfg.wandb_mode, resume_samples_seen=pairs_seen if ckpt is not None else None,
                      tags=("bc", str(dataset.metadata.get("strategy", "user")), cfg.loss, cfg.backbone))

    # The base sampler and CFG on the same held-out prompts and noise: the references of the pass rate.
    references = state.get("references")
    base_images = cfg_images = None  # (a resumed run has the pass rates, not the images: its grids omit them)
    if references is None and distributed.is_main():  # rank 0 evaluates
        base, base_images = pass_rate(cfg, world, held, num_steps)
        cfg_metrics, cfg_images = pass_rate(cfg, world, held, num_steps, cfg_scale=cfg_scale)
        references = {"base": base["pass_rate"], "cfg": cfg_metrics["pass_rate"],
                      "base_attributes": base["attribute_mean"], "cfg_attributes": cfg_metrics["attribute_mean"]}
        print(f"held-out pass rate: base {references['base']:.3f}, CFG {cfg_scale:g} {references['cfg']:.3f}; "
              f"attribute accuracy: base {base['attribute_mean']:.3f}, CFG {cfg_metrics['attribute_mean']:.3f}")
    index = {p: i * cfg.eval_samples_per_prompt for i, p in enumerate(held)}
    grid_index = [index[p] for p in grid_prompts]

    def run_eval() -> dict[str, float]:
        if not distributed.is_main():  # rank 0 evaluates (fixed noise; every rank holds the same policy)
            return {}
        policy.eval()
        metrics, images = pass_rate(cfg, world, held, num_steps, guidance_model=policy,
                                    guidance_scale=cfg.guidance_scale)
        out = {f"eval/verifier_{k}" if k != "pass_rate" else "eval/verifier_pass_rate": v for k, v in metrics.items()}
        out["eval/base_pass_rate"], out["eval/cfg_pass_rate"] = references["base"], references["cfg"]
        out["eval/base_attribute_mean"] = references["base_attributes"]
        out["eval/cfg_attribute_mean"] = references["cfg_attributes"]
        gain = references["cfg"] - references["base"]
        if gain > 0:
            out["eval/cfg_gain_recovered"] = (metrics["pass_rate"] - references["base"]) / gain
        gain = references["cfg_attributes"] - references["base_attributes"]
        if gain > 0:
            out["eval/cfg_attribute_gain_recovered"] = (metrics["attribute_mean"] - references["base_attributes"]) / gain
        out.update({f"eval/bc_{k}": v for k, v in bc_evaluate(loss_module, probe).items()})
        tracker.log(out, pairs_seen)
        columns = {"trained": images[grid_index]}
        if base_images is not None and cfg_images is not None:
            columns = {"base": base_images[grid_index], f"CFG {cfg_scale:g}": cfg_images[grid_index], **columns}
        path = save_prompt_grid(columns, grid_prompts, cfg.run_dir / "samples" / f"eval_{pairs_seen:09d}.png")
        tracker.log_image("eval/samples", path, pairs_seen)
        policy.train()
        return out

    start = time.perf_counter() - elapsed
    last_eval = state.get("last_eval", {})
    if update == 0:
        last_eval = run_eval()

    def out_of_time() -> bool:
        return cfg.time_budget_minutes is not None and time.perf_counter() - start >= 60 * cfg.time_budget_minutes

    bar = tqdm(range(update, cfg.total_updates), initial=update, total=cfg.total_updates, desc="bc",
               disable=not distributed.is_main())
    for update in bar:
        if distributed.any_rank(out_of_time()):
            break
        t0 = time.perf_counter()
        lr = learning_rate(cfg, update)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = replay.sample().to(device)
        try:
            metrics = bc_update(trained, optimizer, batch, max_grad_norm=cfg.max_grad_norm)
        except FloatingPointError as e:
            tracker.finish()
            raise SystemExit(f"stopping at update {update + 1}: {e}; the last checkpoint is "
                             f"{latest_checkpoint(cfg.run_dir)}. Rerun with a lower --lr.") from e
        metrics = distributed.mean_over_ranks(metrics)  # equal batches per rank: the mean over all pairs
        pairs_seen += cfg.batch_size * distributed.world_size()
        done = update + 1
        tracker.log({**{f"losses/{k}": v for k, v in metrics.items()}, "charts/learning_rate": lr,
                     "charts/updates": done, "perf/seconds_per_update": time.perf_counter() - t0,
                     "charts/world_size": distributed.world_size()}, pairs_seen)
        bar.set_postfix(mse=f"{metrics['mse']:.4g}", rel=f"{metrics['relative_error']:.3f}", **(
            {"heldout_pass": f"{last_eval['eval/verifier_pass_rate']:.3f}"} if last_eval else {}))
        stop = distributed.any_rank(out_of_time())
        last = done == cfg.total_updates or stop
        if done % cfg.eval_every == 0 or last:
            last_eval = run_eval()
        if (done % cfg.checkpoint_every == 0 or last) and distributed.is_main():
            save_checkpoint(cfg.run_dir, done, modules={"loss": loss_module}, optimizers={"policy": optimizer},
                            generators={"data": data_gen},
                            state={"pairs_seen": pairs_seen, "elapsed_seconds": time.perf_counter() - start,
                                   "backbone_fingerprint": fingerprint, "config": config_dict, "last_eval": last_eval,
                                   "references": references})
        if stop:
            print(f"time budget of {cfg.time_budget_minutes} min used up after {done} updates")
            break
    bar.close()
    tracker.finish()
    distributed.check_in_sync(loss_module)  # data-parallel ranks must end with the same policy
    if distributed.is_main():
        path = save_guidance_model(policy, cfg.run_dir / "guidance.safetensors")
        shown = {k: round(v, 4) for k, v in last_eval.items() if k.startswith("eval/") and "bc_" not in k}
        print(f"final held-out evaluation after {pairs_seen} pairs: {shown}\nsaved the policy to {path}")
    distributed.cleanup()
    return last_eval


if __name__ == "__main__":
    main(tyro.cli(Config))
