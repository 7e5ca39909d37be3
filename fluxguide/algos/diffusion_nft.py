"""DiffusionNFT for guidance policies: online RL on a black-box reward through the forward (noising) process.

Zheng, Chen, Ye, Wang, Zhang, Jiang, Su, Ermon, Zhu, Liu, "DiffusionNFT: Online Diffusion Reinforcement with
Forward Process" (arXiv 2509.16117, 2025). No likelihoods, no SDE sampler, no reward gradient: the policy samples
clean images with any (here the deterministic Euler) sampler, the reward splits them softly into positives and
negatives, and a flow-matching loss on forward-noised copies of those images moves the policy toward the
positives and away from the negatives. Here the policy is the guided velocity ``v_theta = v_base + g c_theta``
(``c_theta`` the guidance network, ``g`` the guidance scale); the base model stays frozen.

One update:

1. **Collect** (the paper's data step): each prompt ``group_size`` times, sampled by the *old* policy
   ``v_old = v_base + g c_old`` (a slowly moving copy, below) without a graph; the rewards ``R`` of the decoded
   images (no gradient is asked of the reward: any black box); the *optimality probability*
   ``r = 0.5 + 0.5 clip(A / Z, -1, 1)`` with ``A`` the group-normalised reward (``(R - mean) / std`` over the
   prompt's group) and ``Z`` = ``advantage_clip``.
2. **Loss** (the paper's Eq. for the NFT objective): for a clean sample ``x0``, a step ``t`` of the schedule and
   noise ``e``, ``x_t = (1 - t) x0 + t e`` and the flow-matching target ``v = e - x0``. The *implicit positive
   and negative policies* are ``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``
   and the loss is ``r ||v+ - v||^2 + (1 - r) ||v- - v||^2``. Its minimiser (set the gradient in
   ``u = v_theta - v_old`` to zero) is ``u* = E[(2r - 1)(v - v_old) | x_t] / beta = (2 / beta) E[r | x_t] (v^pos -
   v_old)``, with ``v^pos`` the velocity of the reward-weighted distribution ``r(x0) p_old(x0)`` (the paper's
   policy-improvement theorem): the policy moves toward the positives by an amount ``1 / beta`` sets.
3. **Old policy** (the paper's soft update): ``theta_old <- eta theta_old + (1 - eta) theta`` after the update
   (``eta`` = ``old_policy_decay``; 0 makes the next update fully on-policy).

A constant reward gives ``r = 1/2`` everywhere, a zero gradient at ``theta = theta_old``: the start is kept.
With a linear reward on Gaussian data the minimiser shifts the data mean by ``Sigma c / (Z std(R) beta)`` and leaves
its covariance alone (``tests/algos/test_diffusion_nft.py`` checks it against the closed form).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fluxguide.algos.common import LossOutput, unwrap_data_parallel
from fluxguide.algos.on_sampler import Decoder, OnSamplerAlgorithm
from fluxguide.algos.ppo import group_advantages
from fluxguide.algos.registry import AlgorithmSpec, Stage, budgets
from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.rewards.base import call_reward
from fluxguide.sampling.conditioning import model_velocity
from fluxguide.sampling.denoise import denoise, scale_at

__all__ = ["SPECS", "DiffusionNFT", "DiffusionNFTConfig", "NFTBatch", "nft_loss", "optimality_probability"]


@dataclass
class DiffusionNFTConfig:
    """Settings of one DiffusionNFT update.

    Attributes:
        num_steps: sampling steps (the collection's sampler and the steps the loss is taken at).
        guidance_scale: scale of the policy's correction (``pred + scale * correction``).
        group_size: samples per prompt; rewards are normalised within each prompt's group.
        beta: the implicit policies' strength (``1 / beta`` scales how far one round moves the policy).
        advantage_clip: ``Z`` of ``r = 0.5 + 0.5 clip(A / Z, -1, 1)``.
        time_subsample: take the loss at this many of the steps, drawn per update (``None``: all).
        min_t: take the loss only at steps with ``t >= min_t``: where the policy acts (``--policy-min-t``); the
            others would cost model calls and teach nothing.
        inner_steps: optimizer steps on one collected batch (fresh forward noise each).
        old_policy_decay: ``eta`` of the old policy's soft update after each update.
        max_grad_norm: clip the global gradient norm (``None``: no clipping).
    """

    num_steps: int = 20
    guidance_scale: float = 1.0
    group_size: int = 4
    beta: float = 1.0
    advantage_clip: float = 2.0
    time_subsample: int | None = 4
    min_t: float = 0.0
    inner_steps: int = 1
    old_policy_decay: float = 0.5
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        checks = {"num_steps": self.num_steps >= 1, "group_size": self.group_size >= 1, "beta": self.beta > 0,
                  "advantage_clip": self.advantage_clip > 0, "inner_steps": self.inner_steps >= 1,
                  "old_policy_decay": 0.0 <= self.old_policy_decay <= 1.0, "min_t": 0.0 <= self.min_t <= 1.0,
                  "time_subsample": self.time_subsample is None or 1 <= self.time_subsample <= self.num_steps,
                  "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"DiffusionNFTConfig: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of "
                             "range (num_steps, group_size, inner_steps >= 1; beta, advantage_clip, max_grad_norm "
                             "> 0; old_policy_decay, min_t in [0, 1]; time_subsample in [1, num_steps] or None)")


@dataclass
class NFTBatch:
    """One collected batch: the old policy's clean latents, their conditioning, raw rewards and optimality."""

    cond: Conditioning
    latents: torch.Tensor
    rewards: torch.Tensor
    optimality: torch.Tensor
    stats: dict[str, float]
    generator: torch.Generator | None


def optimality_probability(rewards: torch.Tensor, group_size: int, clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``r = 0.5 + 0.5 clip(A / clip, -1, 1)`` with ``A`` the rewards ``(B,)`` normalised within each group of
    ``group_size`` consecutive samples (a group whose rewards are all equal gets ``r = 1/2``: no signal)."""
    adv, stats = group_advantages(rewards.float()[:, None], group_size)
    return 0.5 + 0.5 * (adv[:, 0] / clip).clamp(-1.0, 1.0), stats


def nft_loss(correction: torch.Tensor, old_correction: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
             optimality: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """The NFT objective at one step: ``mean_b [r ||v+ - v||^2 + (1 - r) ||v- - v||^2]`` (mean over elements).

    ``v_old = pred + scale * old_correction``, ``v+ / v- = v_old +/- beta * scale * (correction - old_correction)``.
    """
    v_old = pred.float() + scale * old_correction.float()
    step = beta * scale * (correction.float() - old_correction.float())
    positive = (v_old + step - target).square().flatten(1).mean(1)
    negative = (v_old - step - target).square().flatten(1).mean(1)
    return (optimality * positive + (1 - optimality) * negative).mean()


class DiffusionNFT(OnSamplerAlgorithm):
    """DiffusionNFT updates of a guidance policy against a black-box reward (no gradient asked of it).

    Args:
        backbone, policy, reward, optimizer: as :class:`~fluxguide.algos.on_sampler.OnSamplerAlgorithm`; the
            reward is only called, never differentiated.
        config: see :class:`DiffusionNFTConfig`.
        decode: latents -> images for the reward (default ``backbone.decode``).

    ``update(prompts, generator)`` samples each prompt ``group_size`` times. A checkpoint holds ``policy`` and
    ``old_policy`` (so a resumed run continues from the same old policy) and the optimizer. Metrics:
    ``loss_nft``, ``reward_mean`` / ``reward_std`` (the raw rewards of the old policy's samples),
    ``optimality_mean``, ``group_reward_std``, ``zero_std_group_fraction``, ``policy_drift`` (RMS of
    ``g (c_theta - c_old)``) and ``grad_norm``.
    """

    name = "diffusion-nft"
    loss_name = "NFT loss"
    advice = "Lower the learning rate or raise --beta"

    def __init__(self, backbone: Backbone, policy: nn.Module, reward: nn.Module, optimizer: torch.optim.Optimizer,
                 config: DiffusionNFTConfig | None = None, *, decode: Decoder | None = None) -> None:
        self.config = config or DiffusionNFTConfig()
        super().__init__(backbone, policy, reward, optimizer, num_steps=self.config.num_steps, decode=decode)
        self.old_policy = copy.deepcopy(unwrap_data_parallel(policy)).eval().requires_grad_(False)
        self.modules["old_policy"] = self.old_policy

    def collect(self, prompts: list[str], generator: torch.Generator | None = None) -> NFTBatch:
        """Each prompt ``group_size`` times, sampled by the old policy; rewards and optimality probabilities."""
        k = self.config.group_size
        batch = super().collect([p for p in prompts for _ in range(k)], generator)
        cond = batch.cond
        with torch.no_grad():
            latents = denoise(self.model, batch.noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, self.timesteps,
                              guidance=self.backbone.default_guidance, guidance_model=self.old_policy,
                              guidance_scale=self.config.guidance_scale)
            rewards = call_reward(self.reward, self.decode(latents), cond.prompts).detach()
        optimality, stats = optimality_probability(rewards, k, self.config.advantage_clip)
        return NFTBatch(cond, latents, rewards, optimality, stats, generator)

    def loss(self, batch: NFTBatch) -> LossOutput:
        """The NFT objective on forward-noised copies of ``batch``'s samples, averaged over the drawn steps."""
        self.policy.train()
        cfg, cond, x0 = self.config, batch.cond, batch.latents
        acting = [i for i in range(cfg.num_steps) if float(self.timesteps[i]) >= cfg.min_t] or [0]
        order = torch.randperm(len(acting), generator=batch.generator)[: cfg.time_subsample or cfg.num_steps]
        terms, drift = [], []
        for i in sorted(acting[j] for j in order.tolist()):
            t = float(self.timesteps[i])
            noise = torch.randn(x0.shape, generator=batch.generator).to(x0)
            x_t = (1 - t) * x0 + t * noise  # the forward process of rectified flow (t = 1: noise)
            t_vec = torch.full((x0.shape[0],), t, device=x0.device, dtype=x0.dtype)
            with torch.no_grad():
                pred = model_velocity(self.model, x_t, t_vec, cond, self.backbone.default_guidance)
                old = self.old_policy(x_t, pred, cond.txt, cond.vec, t_vec, i)
            correction = self.policy(x_t, pred, cond.txt, cond.vec, t_vec, i)
            scale = scale_at(cfg.guidance_scale, i, cfg.num_steps)
            terms.append(nft_loss(correction, old, pred, noise - x0, batch.optimality, cfg.beta, scale))
            drift.append(float((scale * (correction.detach() - old)).float().square().mean()))
        rewards = batch.rewards
        metrics = {"reward_mean": float(rewards.mean()),
                   "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
                   "optimality_mean": float(batch.optimality.mean()), **batch.stats,
                   "policy_drift": (sum(drift) / len(drift)) ** 0.5}
        loss = torch.stack(terms).mean()
        if not loss.requires_grad:  # the policy gave no graph at these steps (e.g. gated off): a zero step, on
            loss = loss + sum(0.0 * p.sum() for p in self.policy.parameters() if p.requires_grad)  # every rank
        return LossOutput({"loss_nft": loss}, metrics, count=len(rewards), pooled_std={"reward_std": "reward_mean"})

    def update(self, prompts: list[str], generator: torch.Generator | None = None) -> dict[str, float]:
        """Collect, take ``inner_steps`` optimizer steps on the batch, then move the old policy toward the policy."""
        batch = self.collect(prompts, generator)
        for _ in range(self.config.inner_steps):
            metrics = self.optimize(self.loss(batch))
        self.update_old_policy()
        return metrics

    @torch.no_grad()
    def update_old_policy(self) -> None:
        """``theta_old <- eta theta_old + (1 - eta) theta`` (the paper's soft update; buffers are copied)."""
        eta = self.config.old_policy_decay
        policy = unwrap_data_parallel(self.policy)
        for old, new in zip(self.old_policy.parameters(), policy.parameters(), strict=True):
            old.lerp_(new.detach(), 1.0 - eta)
        for old, new in zip(self.old_policy.buffers(), policy.buffers(), strict=True):
            old.copy_(new)


_SMOKE = ("--batch-size", "2", "--group-size", "2", "--total-updates", "2")

SPECS = (AlgorithmSpec(
    "diffusion-nft", "DiffusionNFT: flow matching on the policy's own samples, weighted by a black-box reward",
    (Stage(Path("train_diffusion_nft.py"), budgets=budgets(_SMOKE, 320)),), DiffusionNFT, reward="black-box"),)
