"""Train a guidance policy by PPO on the denoising MDP (TorchRL collector, ClipPPOLoss), against any reward.

    python experiments/train_ppo.py                                   # the shapes preset (README headline)
    python experiments/train_ppo.py --backbone tiny-flux --total-updates 5   # tiny random Flux code path
    python experiments/train_ppo.py --preset flux-dev --train-prompts prompts.txt   # FLUX.1-dev on a GPU
    python experiments/train_ppo.py --help                            # every option and the presets

The default (``--preset shapes``) is the best recipe known on the shapes world (docs/results.md): the affine
policy on the first 10 of 20 steps exploring its own 6 coefficients per step in ODE mode, trained on the verifier
with partial credit, prompt groups of 8 that share their initial noise.

Each update collects one episode of ``batch_size`` trajectories (``samples_per_prompt`` per *training* prompt)
with the Gaussian policy on the TorchRL env -- in SDE mode the policy's std is the SDE's, so exploration is the
sampler's own noise (Flow-GRPO; on ``--sde-window`` steps only); in ODE mode it is a fixed Gaussian std --
computes advantages (per-prompt normalised returns, or GAE) and runs ``epochs`` passes of ClipPPOLoss over
minibatches of whole trajectories (``fluxguide.algos.PPO``). Every ``eval_every`` updates the mean policy is
evaluated on the *held-out* prompts with fixed noise and the deterministic (ODE) sampler: the reward and, on the
shapes world, the verifier's pass rate, plus a PNG grid. Metrics go to W&B (offline unless ``--wandb-mode
online``) and ``<run_dir>/metrics.jsonl`` against ``charts/samples_seen``.

Checkpoints are written every ``checkpoint_every`` updates to ``<run_dir>/checkpoints``; rerunning the same
command continues from the last one with the same RNG streams. A non-finite loss or log-prob stops the run with a
message and writes no checkpoint.

Under ``torchrun`` every process collects its own episodes (``--batch-size`` trajectories per process, its own
prompts and noise) and the gradients are averaged over processes; rank 0 logs the gathered metrics and writes the
files (docs/distributed.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from fluxguide import distributed
from fluxguide.algos.ppo import PPO, AdvantageMode, PPOConfig
from fluxguide.envs import GuidanceTorchRLEnv
from fluxguide.harness import BackboneConfig, Flat, PolicyConfig, RewardConfig, Run, RunConfig, TrainConfig
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_float, check_int
from fluxguide.harness.presets import flux_dev_preset
from fluxguide.policies import make_ppo_actor, make_value_network
from fluxguide.policies.registry import latent_grid

#: The metrics logged as ``train/<name>``; the loss terms and PPO's diagnostics go to ``losses/<name>``.
TRAIN_METRICS = ("reward_mean", "reward_std", "group_reward_std", "zero_std_group_fraction", "verifier_pass_rate",
                 "init_kl")
DIAGNOSTICS = ("grad_norm", "clip_fraction", "kl_approx", "ESS", "mean_ratio", "max_ratio", "explained_variance",
               "entropy", "first_mean_ratio", "first_max_ratio", "first_clip_fraction")


#: The shapes preset's budget: updates of 64 trajectories (the README's headline is measured at it).
PPO_UPDATES = 80


@dataclass
class Config:
    """PPO; the defaults are the shapes preset."""

    run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(
        run_dir=Path("runs/ppo/shapes"), total_updates=PPO_UPDATES, eval_every=PPO_UPDATES // 4,
        checkpoint_every=PPO_UPDATES // 4, wandb_group="ppo"))
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
    # need not be differentiable
    reward: Flat[RewardConfig] = field(default_factory=lambda: RewardConfig(reward="verifier-partial"))
    guide: Flat[PolicyConfig] = field(default_factory=lambda: PolicyConfig(policy="affine", hidden_dim=8,
                                                                           policy_min_t=0.64))
    optim: Flat[TrainConfig] = field(default_factory=lambda: TrainConfig(batch_size=64, lr=1e-3))
    coarse_actions: bool = False
    """explore and correct with coarse corrections, one value per token and image channel (192 numbers per
    shapes-world step instead of 3,072): the policy-gradient noise shrinks with the action's dimension (ODE mode)"""
    explore_coefficients: bool = True
    """with --policy affine, or any policy under --head affine, in --mode ode (without --coarse-actions): explore
    in the affine schedule's 2 x channels coefficients of img and pred (6 numbers per shapes-world step), each with
    std --std, instead of in the whole correction (a network under the head adds its correction unexplored).
    Other policies and modes always explore the whole correction"""
    mode: Literal["sde", "ode"] = "ode"
    """'sde': the marginal-preserving SDE sampler with the policy's std set to the SDE's (Flow-GRPO);
    'ode': the Euler sampler with Gaussian policy noise of std --std"""
    noise_level: float = 0.7
    """SDE noise level a of sigma_t = a sqrt(t / (1 - t)) (SDE mode)"""
    sde_window: tuple[int, int] | None = None
    """SDE mode: SDE steps (and exploration) only at steps START..STOP-1, Euler steps elsewhere (Flow-GRPO-Fast)"""
    std: float | None = None
    """policy std in ODE mode (initial std with --learn-std). Default: 1.0 on explored coefficients, 0.1 on
    whole corrections"""
    learn_std: bool = False
    """learn one log-std parameter (ODE mode)"""
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """reduce the per-element log-density by mean (sane ratios at high dimension) or sum (exact)"""
    control_cost: float = 0.0
    """KL penalty to the base sampler: the env's per-step control cost (exact Gaussian KL in SDE mode)"""
    init_kl: float = 0.0
    """weight of the KL to the initial policy (--init-policy, else the policy as built) on each minibatch's
    states: keeps a fine-tuned policy near its distilled start, as DDPO-style fine-tuning does"""
    shared_group_noise: bool = True
    """start the trajectories of a prompt group from one initial noise (common random numbers, as in
    DanceGRPO): their rewards then differ only through the exploration noise"""
    advantage: AdvantageMode = "group"
    """'group': per-prompt normalised returns (critic-free, DDPO / GRPO); 'gae': GAE with a value network"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    critic_coef: float = 0.5
    """weight of the critic loss (GAE)"""
    clip_epsilon: float = 0.2
    """PPO clip range"""
    epochs: int = 2
    """PPO passes over each collected batch"""
    minibatch_trajectories: int = 16
    """whole trajectories per minibatch"""
    samples_per_prompt: int = 8
    """trajectories per prompt (the group of the per-prompt advantage)"""
    entropy_coef: float = 0.0
    """entropy bonus (only moves a learned std)"""

    def validate(self) -> None:
        check_float("noise_level", self.noise_level)
        check_float("std", self.std, optional=True)
        check_float("control_cost", self.control_cost, strict=False)
        check_float("init_kl", self.init_kl, strict=False)
        check_float("gae_lambda", self.gae_lambda, strict=False, maximum=1.0)
        check_float("critic_coef", self.critic_coef, strict=False)
        check_float("clip_epsilon", self.clip_epsilon)
        check_int("epochs", self.epochs)
        check_int("minibatch_trajectories", self.minibatch_trajectories)
        check_int("samples_per_prompt", self.samples_per_prompt)
        check_float("entropy_coef", self.entropy_coef, strict=False)
        batch = self.optim.batch_size
        if isinstance(batch, int) and batch > 0 and batch % self.samples_per_prompt:
            raise ConfigError(f"--batch-size {batch} is not a multiple of --samples-per-prompt "
                              f"{self.samples_per_prompt}: every prompt's group needs all its trajectories")
        if isinstance(batch, int) and self.minibatch_trajectories > batch:
            raise ConfigError(f"--minibatch-trajectories {self.minibatch_trajectories} exceeds the --batch-size {batch} "
                              f"trajectories collected per update: use --minibatch-trajectories <= {batch}")


def flux_dev() -> Config:
    """FLUX.1-dev on one GPU (not measured here): the shapes recipe's policy and exploration, a CLIP score."""
    cfg = flux_dev_preset(Config, "ppo", "ppo", batch_size=16, lr=1e-3, samples_per_prompt=4, minibatch_trajectories=4,
                          guide=PolicyConfig(policy="affine", hidden_dim=8, policy_min_t=0.64))
    return replace(cfg, run=replace(cfg.run, total_updates=200, eval_every=20, checkpoint_every=20))


#: Flow-GRPO's KL coefficient to the reference policy (Liu et al., 2025, "Flow-GRPO", GenEval setting).
GRPO_KL = 0.04


def grpo() -> Config:
    """GRPO as Flow-GRPO / DanceGRPO run it (Liu et al., 2025; Xue et al., 2025): group-relative advantages over
    the samples of one prompt (no critic), exploration by the marginal-preserving SDE sampler, and a KL penalty
    to the reference (initial) policy; the shapes preset's policy, reward, groups and budget otherwise."""
    cfg = Config()
    cfg.run = replace(cfg.run, preset="grpo", run_dir=Path("runs/grpo/shapes"), wandb_group="grpo")
    cfg.mode, cfg.advantage, cfg.init_kl = "sde", "group", GRPO_KL
    return cfg


PRESETS = {"shapes": Config, "flux-dev": flux_dev, "grpo": grpo}


def main(cfg: Config) -> dict[str, float]:
    run = Run(cfg.run, cfg, name="ppo", hint="lower --lr, --clip-epsilon or --std")
    seed, opt = cfg.run.seed, cfg.optim
    backbone = cfg.model.build(seed=seed, device=run.device, num_steps=opt.num_steps)
    train = cfg.reward.prompts(backbone)  # prompts the backbone cannot render are refused here, before any model runs
    cfg.run.heldout_prompts(backbone)  # the held-out ones too, not at the first evaluation
    reward = cfg.reward.build(backbone, seed=seed)
    env = GuidanceTorchRLEnv(backbone, reward=reward, prompts=train, batch_size=opt.batch_size,
                             samples_per_prompt=cfg.samples_per_prompt, num_steps=opt.num_steps,
                             guidance_scale=opt.guidance_scale, mode=cfg.mode, noise_level=cfg.noise_level,
                             sde_window=cfg.sde_window, control_cost=cfg.control_cost,
                             shared_group_noise=cfg.shared_group_noise)
    env.set_seed(distributed.rank_seed(seed))  # each rank its own prompts and noise
    policy = cfg.guide.build(backbone, coarse=cfg.coarse_actions)
    actor, _ = make_ppo_actor(policy, backbone, mode=cfg.mode, std=cfg.std, learn_std=cfg.learn_std,
                              explore_coefficients=cfg.explore_coefficients, coarse=cfg.coarse_actions,
                              log_prob_reduction=cfg.log_prob_reduction, explore_min_t=cfg.guide.policy_min_t)
    reference = cfg.guide.reference(actor, cfg.init_kl)  # the initial actor, before any update or resume
    critic = None
    if cfg.advantage == "gae":
        critic = make_value_network(backbone.latent_channels, cfg.guide.hidden_dim, cfg.guide.num_layers,
                                    backbone.encode([""]).vec.shape[-1], latent_grid(backbone), device=run.device)
    extra = [*actor.parameters(), *(critic.parameters() if critic is not None else ())]  # log-std, critic
    optimizer = torch.optim.Adam(cfg.guide.param_groups(policy, opt.lr, extra), lr=opt.lr,
                                 weight_decay=opt.weight_decay)
    distributed.reseed_rank_streams(seed)  # same init on every rank, then each rank's own policy sampling
    ppo = PPO(env, actor, optimizer, PPOConfig(
        clip_epsilon=cfg.clip_epsilon, epochs=cfg.epochs, minibatch_trajectories=cfg.minibatch_trajectories,
        advantage=cfg.advantage, lmbda=cfg.gae_lambda, critic_coef=cfg.critic_coef, entropy_coef=cfg.entropy_coef,
        max_grad_norm=opt.max_grad_norm, init_kl=cfg.init_kl,
    ), critic=critic, reference=reference)

    def pending_episode() -> dict[str, torch.Generator]:  # the env's generator as the pending episode drew it
        episode = torch.Generator().manual_seed(0)
        episode.set_state(env.core.episode_rng_state)
        return {"env": episode}

    # Resume: weights, optimizer, RNG streams, and the env's generator as it was when the pending episode was
    # drawn, which the collector then redraws.
    if run.resume(backbone, ppo.modules, ppo.optimizers, {"env": env.core.generator},
                  save_generators=pending_episode, tags=("ppo", cfg.reward.reward, cfg.model.backbone, cfg.mode,
                                                         cfg.advantage)):
        ppo.restart_episode()
    run.evaluate_heldout(backbone, reward, policy, guidance_scale=opt.guidance_scale, num_steps=opt.num_steps)

    for _ in run.loop(samples_per_update=opt.batch_size):
        metrics = run.step(ppo.update)
        run.log(metrics, train=TRAIN_METRICS, losses=lambda k: k.startswith("loss") or k in DIAGNOSTICS,
                postfix={"reward": "reward_mean"})
    ppo.shutdown()
    return run.finish(policy, sync=ppo.modules)


if __name__ == "__main__":
    cli(main, Config, presets=PRESETS)
