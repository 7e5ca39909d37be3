"""Train a guidance policy by behaviour cloning on a dataset written by ``experiments/collect_data.py``.

    python experiments/collect_data.py --out-dir runs/bc_data/cfg_distillation      # collect first
    python experiments/train_bc.py --dataset runs/bc_data/cfg_distillation          # then clone it
    python experiments/train_bc.py --preset flux-dev                                # FLUX.1-dev on a GPU
    python experiments/train_bc.py --help                                           # every option and the presets

The default (``--preset shapes``, with ``collect_data.py``'s default dataset) is the recipe of the README's
headline: CFG distillation into the text-aware attention network (docs/results.md).

A DAgger round (Ross et al. 2011): let the trained policy drive the sampler while CFG labels its states, append
those pairs to the dataset, and continue from the policy::

    python experiments/collect_data.py --out-dir runs/bc_data/cfg_distillation --seed 1 --episodes 512 \
        --student-checkpoint runs/bc/cfg_distillation/guidance.safetensors
    python experiments/train_bc.py --dataset runs/bc_data/cfg_distillation --run-dir runs/bc/cfg_dagger \
        --init-policy runs/bc/cfg_distillation/guidance.safetensors

The dataset must come from the base model loaded here: the backbone fingerprint its collection recorded is
compared with this one's, and a dataset of another model is refused before any work (``fluxguide.provenance``).
It is loaded (all its appended chunks, every file checked against its SHA-256) into a TorchRL replay buffer;
each update samples a batch of (observation, target correction) pairs and takes one optimizer step on the BC
loss (MSE or Gaussian log-likelihood, ``fluxguide.algos.BehaviourCloning``). Every ``eval_every`` updates the
policy samples the *held-out* prompts with fixed noise, at one base-model call per step, and the backbone's
exact verifier scores them (``fluxguide.harness.evaluation.ReferenceEvaluator``); the base sampler and CFG are
scored once with the same noise, so ``eval/verifier_pass_rate`` can be read against
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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fluxguide import distributed
from fluxguide.algos.bc import BCConfig, BCLoss, BehaviourCloning, check_dataset_matches_policy
from fluxguide.backbones.calls import MODEL_CALLS
from fluxguide.data import GuidanceDataset
from fluxguide.harness import BackboneConfig, Flat, PolicyConfig, Run, RunConfig, TrainConfig
from fluxguide.harness.cli import cli
from fluxguide.harness.config import check_float, check_int
from fluxguide.harness.evaluation import ReferenceEvaluator, recommended_cfg_scale
from fluxguide.harness.presets import flux_dev_model, flux_dev_run
from fluxguide.provenance import backbone_fingerprint, check_dataset_fingerprint

#: The shapes preset's budget: updates of 128 pairs (the README's headline is measured at it).
BC_UPDATES = 1500


@dataclass
class Config:
    """Behaviour cloning; the defaults are the shapes preset."""

    dataset: Path = Path("runs/bc_data/cfg_distillation")
    """the dataset folder written by experiments/collect_data.py"""
    run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(
        run_dir=Path("runs/bc/cfg_distillation"), total_updates=BC_UPDATES, eval_every=BC_UPDATES // 3,
        checkpoint_every=BC_UPDATES // 3, eval_samples_per_prompt=4, wandb_group="bc"))
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)  # the dataset's; its verifier evaluates
    guide: Flat[PolicyConfig] = field(default_factory=PolicyConfig)
    optim: Flat[TrainConfig] = field(default_factory=lambda: TrainConfig(batch_size=128, lr=1e-3, num_steps=None))
    loss: Literal["mse", "gaussian_nll"] = "mse"
    """BC loss"""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """learning-rate schedule over total_updates (after a linear warm-up of warmup_updates)"""
    warmup_updates: int = 50
    """linear warm-up updates"""
    storage: Literal["memory", "memmap"] = "memory"
    """replay-buffer storage: in memory, or memory-mapped in <run_dir>/replay (datasets larger than RAM)"""
    cfg_scale: float | None = None
    """CFG scale of the reference evaluation (default: the dataset's, else the backbone's recommended one)"""
    references: bool = True
    """score the base sampler and CFG once on the held-out evaluation's prompts and noise, as the references of its
    pass rate (eval/base_pass_rate, eval/cfg_pass_rate, eval/cfg_gain_recovered and the grids' columns); the
    distil-then-fine-tune chain leaves them out (--no-references): the fine-tuning after it is what it compares"""

    def validate(self) -> None:
        check_int("warmup_updates", self.warmup_updates, minimum=0)
        check_float("cfg_scale", self.cfg_scale, optional=True)


def flux_dev() -> Config:
    """FLUX.1-dev on one GPU (not measured here): the dataset of ``collect_data.py --preset flux-dev``."""
    return Config(dataset=Path("runs/bc_data/flux-dev"),
                  run=flux_dev_run(preset="flux-dev", run_dir=Path("runs/bc/flux-dev"), total_updates=2000,
                                   eval_every=250, checkpoint_every=250, wandb_group="bc"),
                  model=flux_dev_model(), optim=TrainConfig(batch_size=64, lr=1e-3, num_steps=None))


PRESETS = {"shapes": Config, "flux-dev": flux_dev}


def main(cfg: Config) -> dict[str, float]:
    run = Run(cfg.run, cfg, name="bc", unit="pair", hint="lower --lr")
    seed, opt, device = cfg.run.seed, cfg.optim, run.device
    dataset = GuidanceDataset(cfg.dataset)
    backbone = cfg.model.build(seed=seed, device=device)
    meta = dataset.metadata
    # States and targets of another base model would clone a policy for that model: refused before any work.
    check_dataset_fingerprint(meta.get("backbone_fingerprint"), backbone_fingerprint(backbone), cfg.dataset)
    cfg.run.heldout_prompts(backbone)  # held-out prompts the backbone cannot render: refused now, not after training
    num_steps = opt.num_steps or int(meta.get("num_steps", backbone.default_num_steps))
    cfg_scale = cfg.cfg_scale or float(meta.get("cfg_scale", recommended_cfg_scale(backbone)))
    policy = cfg.guide.build(backbone)  # or --init-policy's (a DAgger round continues from the last policy)
    check_dataset_matches_policy(dataset, policy)
    loss_module = BCLoss(policy, loss_type=cfg.loss).to(device)
    distributed.reseed_rank_streams(seed)  # same init on every rank, then each rank's own stream
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    bc = BehaviourCloning(loss_module, optimizer, BCConfig(
        lr=opt.lr, lr_schedule=cfg.lr_schedule, warmup_updates=cfg.warmup_updates,
        total_updates=cfg.run.total_updates, max_grad_norm=opt.max_grad_norm))
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(seed))  # each rank samples its own pairs
    scratch = cfg.run.run_dir / ("replay" if distributed.is_main() else f"replay-rank{distributed.rank()}")
    replay = dataset.replay_buffer(opt.batch_size, storage=cfg.storage, scratch_dir=scratch, device=device,
                                   generator=data_gen)
    probe = dataset.sample(min(1024, len(dataset)), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    print(f"{cfg.dataset}: {dataset.num_episodes} episodes, {len(dataset)} pairs ({meta.get('strategy')}); "
          f"policy {type(policy).__name__} with {sum(p.numel() for p in policy.parameters()):,} parameters")

    run.resume(backbone, bc.modules, bc.optimizers, {"data": data_gen},
               tags=("bc", str(meta.get("strategy", "user")), cfg.loss, cfg.model.backbone))
    def probe_loss(_policy, tracker, samples_seen: int) -> dict[str, float]:
        """A backbone without a verifier (Flux) has no pass rate: its evaluation is the BC loss on held-back pairs."""
        metrics = {f"eval/bc_{k}": v for k, v in bc.evaluate(probe).items()}
        tracker.log(metrics, samples_seen)
        return metrics

    # The base sampler and CFG on the same held-out prompts and noise: the references of the pass rate.
    with MODEL_CALLS.phase("eval"):  # the references' sampling is evaluation cost (backbones/calls.py)
        evaluator = probe_loss if backbone.verifier is None else ReferenceEvaluator(
            backbone, cfg.run.heldout_prompts(), cfg.run.run_dir, cfg_scale=cfg_scale,
            samples_per_prompt=cfg.run.eval_samples_per_prompt, seed=seed, num_steps=num_steps,
            guidance_scale=opt.guidance_scale, num_grid_prompts=cfg.run.grid_prompts,
            references=run.state.get("references"),
            extra=lambda: {f"eval/bc_{k}": v for k, v in bc.evaluate(probe).items()},
            monitor=run.monitor(backbone, trained=None), score_references=cfg.references,
        ) if distributed.is_main() else None
    run.extra_state["references"] = getattr(evaluator, "references", run.state.get("references"))
    run.evaluate_with(evaluator, policy)

    for update in run.loop(samples_per_update=opt.batch_size):
        metrics = run.step(bc.update, replay.sample().to(device), update)
        run.log(metrics, losses=lambda k: k != "learning_rate", charts=("learning_rate",),
                postfix={"mse": "mse", "rel": "relative_error"})
    return run.finish(policy, sync={"policy": loss_module})


if __name__ == "__main__":
    cli(main, Config, presets=PRESETS)
