"""Train a guidance policy by Adjoint Matching: regress the control onto the lean adjoint of a differentiable reward.

    python experiments/train_adjoint_matching.py                                  # shapes world, tiny-CLIP reward
    python experiments/train_adjoint_matching.py --backbone tiny-flux --total-updates 20    # tiny random Flux
    python experiments/train_adjoint_matching.py --reward-scale 30 --time-subsample 5 --policy-min-t 0.64
    python experiments/train_adjoint_matching.py --help                           # every option

Domingo-Enrich et al., "Adjoint Matching", ICLR 2025 (arXiv 2409.08861); ``fluxguide.algos.AdjointMatching``.
The target is the reward-tilted distribution ``p_base(x) exp(lambda r(x))`` (``lambda`` = ``--reward-scale``).
Each update samples a batch of *training* prompts, runs the policy-controlled memoryless SDE without a graph,
integrates the lean adjoint backwards from ``-lambda grad r`` through the base model only, and takes one
optimizer step on the regression of the correction onto its target on ``--time-subsample`` random steps. The
control cost (the KL of the controlled process to the base one; with ``--init-policy``, to the initial policy's,
``--tilt-from init``) is logged as ``train/control_cost``. The
trained correction is a fine-tuned velocity, so the held-out evaluation uses the ordinary guided Euler sampler.

Everything else is the harness's, as in ``train_reward_gradient.py``: held-out evaluation every ``eval_every``
updates (reward, and the shapes world's verifier pass rate), checkpoints every ``checkpoint_every`` updates in
``<run_dir>/checkpoints`` (rerunning the same command resumes), a clean stop on a NaN/inf loss, metrics in
``<run_dir>/metrics.jsonl`` and W&B (group ``adjoint-matching``), ``guidance.safetensors`` at the end, and
data-parallel training under ``torchrun``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fluxguide import distributed
from fluxguide.algos import AdjointMatching, AdjointMatchingConfig
from fluxguide.algos.adjoint_matching import WEIGHTINGS
from fluxguide.harness import BackboneConfig, Flat, PolicyConfig, RewardConfig, Run, RunConfig, TrainConfig
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_float, check_int
from fluxguide.harness.presets import flux_dev_preset


@dataclass
class Config:
    run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(
        run_dir=Path("runs/adjoint_matching/shapes"), total_updates=200, wandb_group="adjoint-matching"))
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
    reward: Flat[RewardConfig] = field(default_factory=lambda: RewardConfig(reward="shapes-clip"))  # differentiable
    guide: Flat[PolicyConfig] = field(default_factory=PolicyConfig)
    optim: Flat[TrainConfig] = field(default_factory=lambda: TrainConfig(batch_size=16, lr=1e-3))
    reward_scale: float = 10.0
    """lambda of the tilted target p_base * exp(lambda r) (0: the target is the base sampler)"""
    time_subsample: int | None = None
    """regress on this many of the steps, drawn at random per update (default: every step)"""
    weighting: str = "paper"
    """per-step weight of the regression: 'paper' (4 dtau / sigma(t)^2, the paper's loss) or 'velocity' (dtau)"""
    straight_through: bool = False
    """give the reward's gradient to pixels the decoder clamps to [0, 1] (straight-through clamp)"""
    tilt_from: Literal["init", "base"] = "init"
    """with --init-policy: the base process of the control problem. 'init': the initial policy's sampler, so the
    target is p_init * exp(lambda r), the tilt of what the distilled policy samples, and the control cost the KL to
    it; 'base': the base model's, so the target is p_base * exp(lambda r) whatever the start (unlearning it)"""

    def validate(self) -> None:
        check_float("reward_scale", self.reward_scale, strict=False)
        check_int("time_subsample", self.time_subsample, optional=True)
        steps = self.optim.num_steps
        if self.time_subsample is not None and steps is not None and self.time_subsample > steps:
            raise ConfigError(f"--time-subsample {self.time_subsample}: must be <= --num-steps {steps}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"--weighting {self.weighting!r}: must be one of {', '.join(WEIGHTINGS)}")


def flux_dev() -> Config:
    """FLUX.1-dev on one GPU (not measured here): a CLIP score, 28 steps, regression on 7 of them per update."""
    return flux_dev_preset(Config, "adjoint_matching", "adjoint-matching", batch_size=2, lr=1e-4, time_subsample=7)


PRESETS = {"shapes": Config, "flux-dev": flux_dev}


def main(cfg: Config) -> dict[str, float]:
    run = Run(cfg.run, cfg, name="adjoint-matching", hint="lower --lr or --reward-scale")
    seed, opt = cfg.run.seed, cfg.optim
    backbone = cfg.model.build(seed=seed, device=run.device, num_steps=opt.num_steps)
    num_steps = opt.num_steps or backbone.default_num_steps
    prompt_set = cfg.reward.prompts(backbone)  # prompts the backbone cannot render are refused here, before any model
    cfg.run.heldout_prompts(backbone)  # runs; the held-out ones too, not at the first evaluation
    reward = cfg.reward.build(backbone, seed=seed)  # must be differentiable: the adjoint starts at its gradient
    policy = cfg.guide.build(backbone)
    # The initial policy, frozen before any update or resume: the base process of a distilled start's tilt.
    reference = cfg.guide.reference(policy, 0.0) if cfg.tilt_from == "init" else None
    distributed.reseed_rank_streams(seed)  # same policy init on every rank, then each rank's own stream
    # The regression is one backward through the policy at the sampled steps: DDP averages each gradient once.
    algo = AdjointMatching(
        backbone, distributed.data_parallel(policy), reward,
        torch.optim.AdamW(cfg.guide.param_groups(policy, opt.lr), lr=opt.lr, weight_decay=opt.weight_decay),
        AdjointMatchingConfig(num_steps=num_steps, reward_scale=cfg.reward_scale,
                              guidance_scale=opt.guidance_scale, time_subsample=cfg.time_subsample,
                              weighting=cfg.weighting, max_grad_norm=opt.max_grad_norm),
        decode=backbone.straight_through_decoder() if cfg.straight_through else None, reference=reference,
    )
    gen = torch.Generator().manual_seed(distributed.rank_seed(seed))  # the batches' prompts, noise and steps

    run.resume(backbone, algo.modules, algo.optimizers, {"data": gen},
               tags=("adjoint-matching", cfg.reward.reward, cfg.model.backbone))
    run.evaluate_heldout(backbone, reward, policy, guidance_scale=opt.guidance_scale, num_steps=num_steps)

    for _ in run.loop(samples_per_update=opt.batch_size):
        batch = torch.randint(len(prompt_set), (opt.batch_size,), generator=gen).tolist()
        metrics = run.step(algo.update, [prompt_set[i] for i in batch], gen)
        run.log(metrics, train=("reward_mean", "reward_std", "control_cost", "adjoint_norm"),
                losses=("loss", "grad_norm"), postfix={"reward": "reward_mean", "cost": "control_cost"})
    return run.finish(policy)


if __name__ == "__main__":
    cli(main, Config, presets=PRESETS)
