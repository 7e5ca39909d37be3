"""Train a guidance policy by DiffusionNFT: flow matching on its own samples, weighted by a black-box reward.

    python experiments/train_diffusion_nft.py                                   # shapes world, verifier reward
    python experiments/train_diffusion_nft.py --preset shapes-distilled         # from train_bc.py's policy
    python experiments/train_diffusion_nft.py --backbone tiny-flux --total-updates 20      # tiny random Flux
    python experiments/train_diffusion_nft.py --help                            # every option and the presets

Zheng et al., "DiffusionNFT" (arXiv 2509.16117); ``fluxguide.algos.diffusion_nft.DiffusionNFT``. The reward is only
called, never differentiated (default: the shapes world's verifier with partial credit). Each update samples
``--batch-size`` images (``--group-size`` per training prompt) with the old policy, turns their group-normalised
rewards into optimality probabilities and takes a flow-matching step toward the better samples of each group and
away from the worse. The rest is the harness's, as in ``train_reward_gradient.py``: held-out evaluation next to the
training reward, checkpoints and resume, metrics in ``<run_dir>/metrics.jsonl`` and W&B, ``torchrun``. Not yet a
recipe: on the shapes world no setting tried has gained (docs/results.md, "Black-box rewards").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fluxguide import distributed
from fluxguide.algos.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from fluxguide.harness import BackboneConfig, Flat, PolicyConfig, RewardConfig, Run, RunConfig, TrainConfig
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_float, check_int
from fluxguide.harness.presets import distilled_start, flux_dev_preset


@dataclass
class Config:
    """DiffusionNFT; the defaults are the shapes preset."""

    run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(
        run_dir=Path("runs/diffusion_nft/shapes"), total_updates=80, eval_every=20, checkpoint_every=20,
        wandb_group="diffusion-nft"))  # 80 updates of 32 images
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
    reward: Flat[RewardConfig] = field(default_factory=lambda: RewardConfig(reward="verifier-partial"))  # black box
    guide: Flat[PolicyConfig] = field(default_factory=lambda: PolicyConfig(policy="affine", hidden_dim=8,
                                                                           policy_min_t=0.64))
    optim: Flat[TrainConfig] = field(default_factory=lambda: TrainConfig(batch_size=32, lr=1e-2))
    group_size: int = 8
    """samples per prompt: rewards are normalised within each prompt's group (--batch-size must be a multiple)"""
    beta: float = 1.0
    """strength of the implicit positive / negative policies (1 / beta scales how far one round moves)"""
    advantage_clip: float = 2.0
    """Z of the optimality probability r = 0.5 + 0.5 clip(A / Z, -1, 1), A the group-normalised reward"""
    time_subsample: int | None = 4
    """take the loss at this many of the sampling steps, drawn per update (default 4; None: every step)"""
    inner_steps: int = 1
    """optimizer steps on each collected batch"""
    old_policy_decay: float = 0.5
    """eta of the old policy's soft update theta_old <- eta theta_old + (1 - eta) theta (0: fully on-policy)"""

    def validate(self) -> None:
        check_int("group_size", self.group_size)
        check_int("inner_steps", self.inner_steps)
        check_int("time_subsample", self.time_subsample, optional=True)
        check_float("beta", self.beta)
        check_float("advantage_clip", self.advantage_clip)
        check_float("old_policy_decay", self.old_policy_decay, strict=False, maximum=1.0)
        batch = self.optim.batch_size
        if isinstance(batch, int) and batch % self.group_size:
            raise ConfigError(f"--batch-size {batch} is not a multiple of --group-size {self.group_size}: every "
                              "prompt's group needs all its samples")


def flux_dev() -> Config:
    """FLUX.1-dev on one GPU (not measured here): the shapes recipe's policy; the CLIP score as a black box."""
    return flux_dev_preset(Config, "diffusion_nft", "diffusion-nft", batch_size=8, lr=1e-2, group_size=4)


def shapes_distilled() -> Config:
    """DiffusionNFT from the CFG-distilled attention network of ``collect_data.py`` + ``train_bc.py`` (their
    defaults) under a fresh affine head, the head at --lr and the network at a tenth of it."""
    cfg = Config()
    cfg.run = replace(cfg.run, preset="shapes-distilled", run_dir=Path("runs/diffusion_nft/shapes-distilled"),
                      wandb_group="diffusion-nft-distilled")
    cfg.guide = distilled_start(cfg.guide)
    return cfg


PRESETS = {"shapes": Config, "flux-dev": flux_dev, "shapes-distilled": shapes_distilled}


def main(cfg: Config) -> dict[str, float]:
    run = Run(cfg.run, cfg, name="diffusion-nft", hint="lower --lr or raise --beta")
    seed, opt = cfg.run.seed, cfg.optim
    backbone = cfg.model.build(seed=seed, device=run.device, num_steps=opt.num_steps)
    num_steps = opt.num_steps or backbone.default_num_steps
    train = cfg.reward.prompts(backbone)  # prompts the backbone cannot render are refused here, before any model runs
    cfg.run.heldout_prompts(backbone)  # the held-out ones too, not at the first evaluation
    reward = cfg.reward.build(backbone, seed=seed)  # any reward: it is only called
    policy = cfg.guide.build(backbone)
    distributed.reseed_rank_streams(seed)  # same policy init on every rank, then each rank's own stream
    optimizer = torch.optim.AdamW(cfg.guide.param_groups(policy, opt.lr), lr=opt.lr, weight_decay=opt.weight_decay)
    algo = DiffusionNFT(backbone, distributed.data_parallel(policy), reward, optimizer, DiffusionNFTConfig(
        num_steps=num_steps, guidance_scale=opt.guidance_scale, group_size=cfg.group_size, beta=cfg.beta,
        advantage_clip=cfg.advantage_clip, time_subsample=min(cfg.time_subsample or num_steps, num_steps),
        min_t=cfg.guide.policy_min_t, inner_steps=cfg.inner_steps, old_policy_decay=cfg.old_policy_decay, max_grad_norm=opt.max_grad_norm))
    gen = torch.Generator().manual_seed(distributed.rank_seed(seed))  # the batches' prompts, noise and steps

    run.resume(backbone, algo.modules, algo.optimizers, {"data": gen},
               tags=("diffusion-nft", cfg.reward.reward, cfg.model.backbone))
    run.evaluate_heldout(backbone, reward, policy, guidance_scale=opt.guidance_scale, num_steps=num_steps)

    for _ in run.loop(samples_per_update=opt.batch_size):
        batch = torch.randint(len(train), (opt.batch_size // cfg.group_size,), generator=gen).tolist()
        metrics = run.step(algo.update, [train[i] for i in batch], gen)
        run.log(metrics, train=("reward_mean", "reward_std", "optimality_mean", "group_reward_std",
                                "zero_std_group_fraction", "policy_drift"),
                losses=("loss", "loss_nft", "grad_norm"), postfix={"reward": "reward_mean"})
    return run.finish(policy)


if __name__ == "__main__":
    cli(main, Config, presets=PRESETS)
