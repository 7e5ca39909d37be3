"""Reward gradient through a learned reward: train on a black-box reward by fitting a differentiable surrogate.

A black-box reward (the shapes world's verifier, OCR, a VLM judge) is only *called*: on each update's images,
without a gradient. Its scores fit a reward model (:class:`fluxguide.rewards.learned.LearnedReward`: an MLP on a
frozen CLIP's image and text embeddings, refitted online on the policy's own samples as SEIKO does, Uehara et al.
2024), and the policy takes a reward-gradient step through that model (DRaFT / AlignProp's full-trajectory
gradient, :mod:`fluxguide.algos.reward_gradient`). One update:

0. (the first ``warmup`` images only) sample without a graph, score, remember and fit: the policy waits until the
   surrogate has seen enough of its starting images; then its learning rate ramps up over ``ramp`` images;
1. sample the batch with the guided sampler, keeping the graph (as reward gradient does);
2. score the decoded images with the black box (no gradient asked of it) and store their embeddings and scores
   in the surrogate's memory; log how well the surrogate predicted them *before* seeing them (``surrogate_rmse``,
   ``surrogate_corr``: a surrogate that the policy has learned to fool shows here first);
3. fit the surrogate's head on the memory (``fit_steps`` Adam steps of the squared error);
4. backpropagate the refitted surrogate's score of the same images through the sampler into the policy.

The training reward logged (``reward_mean``) is the black box's score of the update's images; the surrogate's own
is ``surrogate_mean``. A checkpoint holds the policy, the surrogate's head and memory, and both optimizers, so a
resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fluxguide import distributed
from fluxguide.algos.common import LossOutput, mean_over_ranks
from fluxguide.algos.distilled import distil_then_fine_tune
from fluxguide.algos.on_sampler import Decoder, SamplerBatch
from fluxguide.algos.reward_gradient import (
    RewardGradient,
    RewardGradientConfig,
    random_translate,
    reward_gradient_loss,
)
from fluxguide.rewards.base import call_reward, describe_reward
from fluxguide.rewards.inputs import check_reward_output
from fluxguide.rewards.learned import LearnedReward
from fluxguide.sampling.denoise import denoise

__all__ = ["SPECS", "LearnedRewardGradient", "SurrogateFitConfig"]


@dataclass
class SurrogateFitConfig:
    """How the surrogate is refitted on each update.

    Attributes:
        steps: Adam steps on the memory per update.
        batch_size: memory rows per step (drawn with replacement).
        warmup: images of the starting policy scored and remembered before the policy's first step (its first
            updates only sample, score and fit): a surrogate fitted on one batch points the policy's first Adam
            step, whose size does not depend on the gradient's, anywhere.
        ramp: images over which the policy's learning rate then rises linearly from 0 to its value (Adam's first
            steps move every weight by about the learning rate, whatever a young surrogate's gradient says).
    """

    steps: int = 32
    batch_size: int = 256
    warmup: int = 256
    ramp: int = 512

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.warmup < 0 or self.ramp < 0:
            raise ValueError(f"SurrogateFitConfig: steps={self.steps}, warmup={self.warmup} and ramp={self.ramp} must "
                             f"be >= 0 and batch_size={self.batch_size} >= 1")


class LearnedRewardGradient(RewardGradient):
    """Reward-gradient updates through a surrogate fitted online to a black-box reward (module docstring).

    Args:
        backbone, policy, optimizer, config: as :class:`~fluxguide.algos.RewardGradient` (full trajectory only).
        black_box: the reward that is trained on; only called, never differentiated.
        surrogate: the learned reward (its head and memory are state; its CLIP stays frozen).
        surrogate_optimizer: over ``surrogate.head``'s parameters.
        fit: see :class:`SurrogateFitConfig`.
        decode, reference: as :class:`~fluxguide.algos.RewardGradient`.

    Metrics: those of reward gradient, with ``reward_mean`` / ``reward_std`` the black box's scores of the
    update's images, plus ``surrogate_mean`` (the surrogate's score the gradient ascended), ``surrogate_rmse``,
    ``surrogate_corr`` (its error and correlation on those images before fitting on them),
    ``surrogate_fit_loss``, ``surrogate_size`` (images scored so far, at most the memory's capacity) and
    ``lr_factor`` (the policy's learning rate over its value: 0 in the warm-up, then the ramp).
    """

    name = "learned-reward-gradient"
    train_metrics = (*RewardGradient.train_metrics, "surrogate_mean", "surrogate_rmse", "surrogate_corr",
                     "surrogate_fit_loss", "surrogate_size", "lr_factor")
    advice = "Lower the learning rate, or fit the surrogate longer (--surrogate-fit-steps)"

    def __init__(self, backbone: object, policy: nn.Module, black_box: nn.Module, surrogate: LearnedReward,
                 optimizer: torch.optim.Optimizer, config: RewardGradientConfig | None = None, *,
                 surrogate_optimizer: torch.optim.Optimizer, fit: SurrogateFitConfig | None = None,
                 decode: Decoder | None = None, reference: nn.Module | None = None) -> None:
        super().__init__(backbone, policy, surrogate, optimizer, config, decode=decode, reference=reference)
        self.black_box, self.surrogate = black_box, surrogate
        self.fit = fit or SurrogateFitConfig()
        self.modules.update(reward_head=surrogate.head, reward_memory=surrogate.memory)
        self.optimizers["reward_head"] = surrogate_optimizer
        self._observed: dict[str, float] = {}

    def update(self, prompts: list[str], generator: torch.Generator | None = None) -> dict[str, float]:
        """One update; while the surrogate's memory holds fewer than ``fit.warmup`` images, a warm-up update that
        samples without a graph, scores, remembers and fits, and leaves the policy alone (``grad_norm`` 0)."""
        seen = int(self.surrogate.memory.count)  # images scored so far (checkpointed: a resumed run ramps alike)
        if seen >= self.fit.warmup:
            # the ramp from the images the policy has trained on, so it needs no state of its own
            factor = min(1.0, (seen - self.fit.warmup + len(prompts)) / self.fit.ramp) if self.fit.ramp else 1.0
            optimizer = self.optimizers["policy"]
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
            return {**super().update(prompts, generator), "lr_factor": factor}
        batch = self.collect(prompts, generator)
        cond = batch.cond
        with torch.no_grad():
            latents = denoise(self.model, batch.noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, self.timesteps,
                              guidance=self.backbone.default_guidance, guidance_model=self.policy,
                              guidance_scale=self.config.guidance_scale)
            images = random_translate(self.decode(latents), self.config.reward_shift, batch.generator)
            self.observe(images, cond.prompts, batch)
        zero = {"loss": 0.0, "loss_reward": 0.0, "grad_norm": 0.0, "lr_factor": 0.0}
        return mean_over_ranks({**zero, **self._observed}, pooled_std={"reward_std": "reward_mean"},
                               count=len(prompts))

    def loss(self, batch: SamplerBatch) -> LossOutput:
        """Sample with a graph, score with the black box, refit the surrogate, and the surrogate's loss terms."""
        self.policy.train()
        self._observed = {}
        out = reward_gradient_loss(
            self.model, self.decode, self.policy, lambda images, prompts: self.observe_and_score(images, prompts,
                                                                                                  batch),
            batch.cond, batch.noise, self.timesteps, self.config, guidance=self.backbone.default_guidance,
            generator=batch.generator, reference=self.reference)
        metrics = {**out.metrics, "surrogate_mean": out.metrics["reward_mean"], **self._observed}
        return LossOutput(out.losses, metrics, count=len(batch.prompts), pooled_std={"reward_std": "reward_mean"})

    def observe_and_score(self, images: torch.Tensor, prompts: list[str], batch: SamplerBatch) -> torch.Tensor:
        """Steps 2-4 of the module docstring on ``images`` (with their graph); returns the surrogate's scores.
        The CLIP embeds the images once, with their graph: the memory keeps them detached, the refitted head
        scores them."""
        embedded = self.surrogate.embed(images, prompts)
        self.observe(images, prompts, batch, embedded)
        self.surrogate.head.eval()
        return check_reward_output(self.surrogate.head(*embedded), len(images), source=describe_reward(self.surrogate))

    def observe(self, images: torch.Tensor, prompts: list[str], batch: SamplerBatch,
                embedded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Steps 2-3: the black box scores ``images``, the surrogate remembers them and is refitted."""
        with torch.no_grad():
            truth = call_reward(self.black_box, images.detach(), prompts).float()
        observed = self.surrogate.remember(images.detach(), prompts, truth, embedded)
        observed.update(self.surrogate.fit(self.optimizers["reward_head"], self.fit.steps, self.fit.batch_size,
                                           batch.generator, before_step=distributed.average_gradients))
        self._observed = {"reward_mean": float(truth.mean()),
                          "reward_std": float(truth.std()) if truth.numel() > 1 else 0.0,
                          **observed, "surrogate_size": float(len(self.surrogate.memory))}


SPECS = (distil_then_fine_tune(
    "learned-reward-gradient",
    "black-box reward: distil CFG 3, then reward gradient through a surrogate fitted online to the verifier",
    "shapes-learned-reward", LearnedRewardGradient, reward="black-box", minutes=40.0),)
