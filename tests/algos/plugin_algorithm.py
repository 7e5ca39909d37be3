"""A new algorithm as a plug-in: the module and the script in one file, registered with no library file edited.

``LastStepReward`` fine-tunes a guidance policy on the gradient of the reward through the *last* sampling step
only (the first steps run without a graph): a new loss on the shared sampler data step. ``SPEC`` registers it
(``compare.py --algorithms tests.algos.plugin_algorithm:SPEC``, or the ``fluxguide.algorithms`` entry-point
group of an installed package), and run as a file this module is the algorithm's training script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxguide.algos import (
    LossOutput,
    OnSamplerAlgorithm,
    RewardGradientConfig,
    SamplerBatch,
    reward_gradient_loss,
)
from fluxguide.algos.registry import SMOKE, AlgorithmSpec, Stage
from fluxguide.harness import BackboneConfig, Flat, PolicyConfig, RewardConfig, Run, RunConfig, TrainConfig
from fluxguide.harness.cli import cli


class LastStepReward(OnSamplerAlgorithm):
    """Reward gradient through the last sampling step only (the earlier steps are the data, sampled without grad)."""

    name = "last-step-reward"

    def __init__(self, backbone, policy, reward, optimizer, num_steps: int | None = None) -> None:
        super().__init__(backbone, policy, reward, optimizer, num_steps=num_steps)
        self.config = RewardGradientConfig(num_steps=num_steps, grad_last_k=1, reward_target=None)

    def loss(self, batch: SamplerBatch) -> LossOutput:
        self.policy.train()
        out = reward_gradient_loss(self.model, self.decode, self.policy, self.reward, batch.cond, batch.noise,
                                   self.timesteps, self.config, guidance=self.backbone.default_guidance,
                                   generator=batch.generator)
        return LossOutput({"loss_reward": out.losses["loss_reward"]}, {"reward_mean": out.metrics["reward_mean"]},
                          count=len(batch.prompts))


SPEC = AlgorithmSpec(
    "last-step-reward", "reward gradient through the last sampling step (a test plug-in)",
    (Stage(Path(__file__), budgets={"smoke": ("--batch-size", "2", "--total-updates", "2", *SMOKE)}),),
    LastStepReward)


@dataclass
class Config:
    run: Flat[RunConfig] = field(default_factory=lambda: RunConfig(
        run_dir=Path("runs/last_step_reward"), total_updates=16, wandb_group="last-step-reward"))
    model: Flat[BackboneConfig] = field(default_factory=BackboneConfig)
    reward: Flat[RewardConfig] = field(default_factory=lambda: RewardConfig(reward="shapes-clip"))
    guide: Flat[PolicyConfig] = field(default_factory=lambda: PolicyConfig(policy="affine", hidden_dim=8))
    optim: Flat[TrainConfig] = field(default_factory=lambda: TrainConfig(batch_size=8, lr=1e-2))


def main(cfg: Config) -> dict[str, float]:
    run = Run(cfg.run, cfg, name="last-step-reward")
    seed, opt = cfg.run.seed, cfg.optim
    backbone = cfg.model.build(seed=seed, device=run.device, num_steps=opt.num_steps)
    prompts = cfg.reward.prompts(backbone)
    reward = cfg.reward.build(backbone, seed=seed)
    policy = cfg.guide.build(backbone)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=opt.lr)
    algo = LastStepReward(backbone, policy, reward, optimizer, num_steps=opt.num_steps)
    gen = torch.Generator().manual_seed(seed)
    run.resume(backbone, algo.modules, algo.optimizers, {"data": gen}, tags=(algo.name,))
    run.evaluate_heldout(backbone, reward, policy, guidance_scale=opt.guidance_scale, num_steps=opt.num_steps)
    for _ in run.loop(samples_per_update=opt.batch_size):
        batch = [prompts[i] for i in torch.randint(len(prompts), (opt.batch_size,), generator=gen).tolist()]
        run.log(run.step(algo.update, batch, gen), train=("reward_mean",), losses=("loss", "grad_norm"))
    return run.finish(policy)


if __name__ == "__main__":
    cli(main, Config)
