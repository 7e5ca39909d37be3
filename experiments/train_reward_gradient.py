"""Train a guidance policy by reward gradient: backpropagate a differentiable reward through the sampler.

    python experiments/train_reward_gradient.py                                # the shapes preset (README headline)
    python experiments/train_reward_gradient.py --backbone tiny-flux --total-updates 20   # tiny random Flux
    python experiments/train_reward_gradient.py --preset flux-dev --train-prompts prompts.txt   # FLUX.1-dev, GPU
    python experiments/train_reward_gradient.py --preset shapes-distilled      # from train_bc.py's policy
    python experiments/train_reward_gradient.py --preset shapes-composite      # the reward study's best reward
    python experiments/train_reward_gradient.py --preset shapes-4-step         # few-step guidance: 4 model calls
    python experiments/train_reward_gradient.py --help                         # every option and the presets

The default (``--preset shapes``) is the best recipe known on the shapes world (docs/results.md): the affine
policy ``a(t) img + b(t) pred`` per colour channel on the first 10 of 20 steps, trained on the tiny CLIP's
caption log-probability of randomly shifted images with AlignProp's reward target. ``--preset shapes-distilled``
fine-tunes the CFG-distilled attention network of ``train_bc.py`` (under an affine head) with the same reward: the
best text-aware neural guidance measured (docs/results.md).

Each update samples a batch of *training* prompts, runs the guided sampler with a graph through the last K
steps, decodes, scores with the reward and takes one optimizer step (``fluxguide.algos.RewardGradient``).
Every ``eval_every`` updates the policy is evaluated on the *held-out* prompts with fixed noise: the reward
and, on the shapes world, the exact verifier's pass rate (the metric that tells real improvement from reward
hacking), plus a PNG grid of samples. Metrics go to W&B (offline unless ``--wandb-mode online``) and to
``<run_dir>/metrics.jsonl``, against ``charts/samples_seen``.

Checkpoints are written every ``checkpoint_every`` updates to ``<run_dir>/checkpoints``. Rerunning the same
command continues from the last one (same update count, same RNG streams, so the curves continue where they
stopped). A NaN/inf loss stops the run with a message and writes no checkpoint.

Under ``torchrun`` every process trains data-parallel on its own prompts and noise (``--batch-size`` per
process) and rank 0 logs the gathered metrics and writes the files (docs/distributed.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fluxguide import distributed
from fluxguide.algos import RewardGradientConfig
from fluxguide.harness import BackboneConfig, Flat, PolicyConfig, RewardConfig, Run, RunConfig, TrainConfig
from fluxguide.harness.cli import cli
from fluxguide.harness.config import ConfigError, check_float, check_int
from fluxguide.harness.presets import distilled_start, few_step_policy, flux_dev_preset
from fluxguide.harness.surrogate import SurrogateConfig
from fluxguide.policies.averaging import PolicyAverage

#: The shapes preset's budget: updates of 16 images (the README's headline is measured at it).
RG_UPDATES = 64


@dataclass
class Config:
    """Reward gradient; the defaults are the shapes preset."""

    run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(
        run_dir=Path("runs/reward_gradient/shapes"), total_updates=RG_UPDATES, eval_every=RG_UPDATES // 4,
        checkpoint_every=RG_UPDATES // 4, wandb_group="reward-gradient"))
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
    reward: Flat[RewardConfig] = field(default_factory=lambda: RewardConfig(reward="shapes-clip-retrieval"))
    guide: Flat[PolicyConfig] = field(default_factory=lambda: PolicyConfig(policy="affine", hidden_dim=8,
                                                                           policy_min_t=0.64))
    optim: Flat[TrainConfig] = field(default_factory=lambda: TrainConfig(batch_size=16, lr=1e-2))
    learned: Flat[SurrogateConfig] = field(default_factory=SurrogateConfig)
    grad_last_k: int | None = None
    """backpropagate through the last K steps only (default: all steps)"""
    random_k: bool = False
    """draw K uniformly from [1, grad_last_k] at every update (AlignProp's randomized truncation)"""
    gradient_checkpointing: bool = False
    """recompute step activations in the backward pass (less memory, about one more forward per step): off on the
    shapes world, whose 16-image graph fits in a few GB, on in the flux-dev preset"""
    control_cost: float = 0.0
    """weight of the control cost (KL to the base sampler) on the corrections"""
    init_kl: float = 0.0
    """weight of the KL to the initial policy (--init-policy, else the policy as built): keeps a fine-tuned
    policy near its distilled start, as DDPO-style fine-tuning keeps the model near the pretrained one"""
    reward_target: float | None = -0.1
    """AlignProp-style reward target: the loss is -min(reward, target)"""
    reward_shift: int = 2
    """score training images shifted by a random offset of up to this many pixels (robust to reward-model
    artefacts such as textures aligned with a ViT's patch grid); evaluation scores unshifted images"""
    one_step: bool = False
    """train with the one-step variant (reward of the predicted clean image at a random step)"""
    policy_average: float | None = None
    """decay of an exponential moving average of the policy's weights (fluxguide.policies.averaging), which the
    evaluations score and the run saves (e.g. 0.98: the last ~50 updates); None: the last iterate"""
    straight_through: bool = False
    """give the reward's gradient to pixels the decoder clamps to [0, 1] (straight-through clamp; shapes world:
    shapes can grow into the black background)"""

    def validate(self) -> None:
        check_int("grad_last_k", self.grad_last_k, optional=True)
        check_float("control_cost", self.control_cost, strict=False)
        check_float("init_kl", self.init_kl, strict=False)
        check_float("reward_target", self.reward_target, minimum=-math.inf, optional=True)
        check_int("reward_shift", self.reward_shift, minimum=0)
        if self.policy_average is not None and not 0.0 < self.policy_average < 1.0:
            raise ConfigError(f"--policy-average {self.policy_average}: a decay in (0, 1), e.g. 0.98 (the last ~50 "
                              "updates), or None for the last iterate")


def flux_dev() -> Config:
    """FLUX.1-dev on one GPU (not measured here): the shapes recipe's policy and schedule, a CLIP score."""
    return flux_dev_preset(Config, "reward_gradient", "reward-gradient", batch_size=2, lr=1e-2,
                           guide=PolicyConfig(policy="affine", hidden_dim=8, policy_min_t=0.64), reward_target=None,
                           reward_shift=0, gradient_checkpointing=True)


def shapes_composite() -> Config:
    """The shapes recipe on the composite reward (tiny-CLIP score + aesthetic head), without a reward target: the
    best reward of the reward study (docs/results.md, "Reward study"); on the study's noise, 3 seeds x 360 images,
    +5.7 points [+3.0, +8.5] over the shapes preset at the same 1,024 images."""
    cfg = Config()
    cfg.run = replace(cfg.run, preset="shapes-composite", run_dir=Path("runs/reward_gradient/shapes-composite"))
    cfg.reward = replace(cfg.reward, reward="shapes-composite")
    cfg.reward_target = None  # a value of the caption log-probability, which would stop this reward's gradient
    return cfg


#: The ``shapes-distilled`` budget: updates of 16 images (docs/results.md, "The chain in one command").
DISTILLED_UPDATES = 72


def shapes_distilled() -> Config:
    """RL from a distilled start (docs/results.md, "Neural guidance from a distilled start" and "The chain in one
    command"): the CFG-distilled attention network of ``train_bc.py`` under a fresh affine head, the head at
    --lr 2e-2 and the network at a tenth of it, on the composite reward (the reward study's best), 72 updates of
    16 images."""
    cfg = shapes_composite()  # the composite reward, started from the distilled network, at twice the rate
    cfg.run = replace(cfg.run, preset="shapes-distilled", run_dir=Path("runs/reward_gradient/shapes-distilled"),
                      wandb_group="reward-gradient-distilled", total_updates=DISTILLED_UPDATES,
                      eval_every=DISTILLED_UPDATES // 2, checkpoint_every=DISTILLED_UPDATES // 2)
    cfg.optim = replace(cfg.optim, lr=2e-2)
    cfg.guide = distilled_start(cfg.guide)
    return cfg


def shapes_few_step(num_steps: int) -> Config:
    """Few-step guidance (docs/results.md, "Few-step guidance"): fine-tune the network distilled for a
    ``num_steps``-step sampler (:func:`~fluxguide.harness.presets.few_step_policy`: CFG's displacements over each
    coarse step) under an affine head on every step, by reward gradient through the ``num_steps``-step sampler, on
    the shapes preset's reward (caption log-probability; the composite reward is hacked within 100 updates at 4
    steps). 4 steps: its reward target, lr 2e-2, 150 updates of 16 images; 2 steps: no reward target (the target
    stops the gradient of images that reach it, and at 2 steps most do before their shapes are right), lr 1e-2,
    300 updates. Both save the average of the weights over about the last 50 updates (``--policy-average 0.98``)
    instead of the last iterate (the ablations of that section)."""
    cfg = Config()
    name = f"shapes-{num_steps}-step"
    if num_steps >= 4:
        updates, lr = 150, 2e-2
    else:
        updates, lr = 300, 1e-2
        cfg.reward_target = None
    cfg.policy_average = 0.98  # the last ~50 updates: +2.8 (4 steps) and +7.2 (2 steps) held-out points, every seed
    cfg.run = replace(cfg.run, preset=name, run_dir=Path(f"runs/reward_gradient/{name}"),
                      wandb_group=f"reward-gradient-{num_steps}-step", total_updates=updates,
                      eval_every=updates // 3, checkpoint_every=updates // 3)
    cfg.optim = replace(cfg.optim, lr=lr, num_steps=num_steps)
    cfg.guide = distilled_start(replace(cfg.guide, policy_min_t=0.0), few_step_policy(num_steps))
    return cfg


def shapes_learned_reward() -> Config:
    """Black-box training (docs/results.md, "Black-box rewards"): ``shapes-distilled`` on the partial-credit verifier
    through a surrogate of it on the tiny CLIP (``--surrogate shapes-clip``): 640 updates, the weights' average."""
    cfg = shapes_distilled()
    cfg.run = replace(cfg.run, preset="shapes-learned-reward", run_dir=Path("runs/reward_gradient/learned"),
                      wandb_group="learned-reward-gradient", total_updates=640, eval_every=40, checkpoint_every=40)
    cfg.reward, cfg.learned = replace(cfg.reward, reward="verifier-partial"), SurrogateConfig(surrogate="shapes-clip")
    return replace(cfg, policy_average=0.98)  # the surrogate's gradient is noisy


PRESETS = {"shapes": Config, "flux-dev": flux_dev, "shapes-distilled": shapes_distilled,
           "shapes-composite": shapes_composite, "shapes-4-step": lambda: shapes_few_step(4),
           "shapes-2-step": lambda: shapes_few_step(2), "shapes-learned-reward": shapes_learned_reward}


def main(cfg: Config) -> dict[str, float]:
    run = Run(cfg.run, cfg, name="reward-gradient", hint="lower --lr or --guidance-scale, or add --control-cost")
    seed, opt = cfg.run.seed, cfg.optim
    backbone = cfg.model.build(seed=seed, device=run.device, num_steps=opt.num_steps)
    train = cfg.reward.prompts(backbone)  # prompts the backbone cannot render are refused here, before any model runs
    cfg.run.heldout_prompts(backbone)  # the held-out ones too, not at the first evaluation
    reward = cfg.reward.build(backbone, seed=seed)  # differentiable, unless --surrogate learns it (then a black box)
    policy = cfg.guide.build(backbone)
    reference = cfg.guide.reference(policy, cfg.init_kl)  # before any update or resume
    distributed.reseed_rank_streams(seed)  # same policy init on every rank, then each rank's own stream
    optimizer = torch.optim.AdamW(cfg.guide.param_groups(policy, opt.lr), lr=opt.lr, weight_decay=opt.weight_decay)
    # DDP fits this loop: the sampler calls the policy at each step, and one backward through them all (with
    # non-reentrant checkpointing) averages each gradient once over the ranks, before clipping.
    algo = cfg.learned.algorithm(backbone, distributed.data_parallel(policy), reward, optimizer, RewardGradientConfig(
        num_steps=opt.num_steps, guidance_scale=opt.guidance_scale, grad_last_k=cfg.grad_last_k, random_k=cfg.random_k,
        gradient_checkpointing=cfg.gradient_checkpointing, control_cost=cfg.control_cost, init_kl=cfg.init_kl,
        reward_target=cfg.reward_target, max_grad_norm=opt.max_grad_norm, reward_shift=cfg.reward_shift),
        seed=seed, one_step=cfg.one_step, reference=reference,
        decode=backbone.straight_through_decoder() if cfg.straight_through else None)
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(seed))  # prompts and noise of the batches

    # The weight average (if any) is what the evaluations score and the run saves; it is checkpointed with the rest.
    average = PolicyAverage(policy, cfg.policy_average) if cfg.policy_average is not None else None
    modules = {**algo.modules, "policy_average": average} if average is not None else algo.modules
    run.resume(backbone, modules, algo.optimizers, {"data": data_gen},
               tags=("reward-gradient", cfg.reward.reward, cfg.model.backbone))
    evaluated = average.average if average is not None else policy
    run.evaluate_heldout(backbone, reward, evaluated, guidance_scale=opt.guidance_scale, num_steps=opt.num_steps)

    for _ in run.loop(samples_per_update=opt.batch_size):
        prompts = [train[i] for i in torch.randint(len(train), (opt.batch_size,), generator=data_gen).tolist()]
        metrics = {"grad_last_k": 1.0, "loss_control": 0.0, **run.step(algo.update, prompts, data_gen)}
        run.log(metrics, train=algo.train_metrics,
                losses=("loss", "loss_reward", "loss_control", "loss_init_kl", "grad_norm"),
                postfix={"reward": "reward_mean"})
        if average is not None:
            average.update(policy)
    return run.finish(evaluated, sync={"policy": policy})


if __name__ == "__main__":
    cli(main, Config, presets=PRESETS)
