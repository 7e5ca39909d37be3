"""Reward-gradient training of guidance policies: backpropagate a differentiable reward through the sampler.

Full trajectory (DRaFT, Clark et al. 2024; AlignProp, Prabhudesai et al. 2023): sample noise, run the guided
Euler sampler with :func:`fluxguide.sampling.denoise` keeping the graph, decode, score with a differentiable
reward and ascend its gradient with respect to the guidance model's weights. Options:

- **Truncation** (DRaFT-K): only the last ``K`` steps keep a graph, earlier ones run without grad. ``K`` is
  fixed, or drawn uniformly from ``[1, K_max]`` at every update (AlignProp's randomized truncation, which
  keeps the cheap late-step gradient and occasionally reaches the early, layout-deciding steps).
- **Gradient checkpointing**: each step's activations are recomputed in the backward pass (memory O(1) in K).
- **Control cost** (a KL to the base sampler) and **KL to the initial policy**: see
  :class:`fluxguide.algos.control_cost.CorrectionRecorder`.
- **Reward target** (a cap against over-optimisation): the reward term is ``-min(r, target)``, so samples
  already past the target give no gradient.
- **Random translation of the scored image** (``reward_shift``, see :func:`random_translate`) and a
  **straight-through clamp** for decoders (:func:`fluxguide.backbones.base.straight_through_clamp`): robustness of the reward signal.
- **Gradient clipping** by global norm, and a hard stop on a non-finite loss or gradient
  (:class:`NonFiniteLossError`) *before* the optimizer step, so weights are never poisoned.

One-step variant (the seed's ``GuidanceModelTrainer.train_from_reward``): at a sampled step ``i`` the guided
prediction gives the predicted clean latent ``x0 = img - t_i * (pred + scale * correction)`` (one Euler step
to ``t = 0``); the loss is ``-reward(decode(x0))``. Cheap (one model call with a graph) but myopic.

Losses follow TorchRL's convention: a dict of named terms (``loss_reward``, ``loss_control``) that the caller
sums (:func:`total_loss`); metrics are a separate dict of floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fluxguide.algos.common import LossOutput
from fluxguide.algos.control_cost import CorrectionRecorder, step_kl
from fluxguide.algos.on_sampler import Decoder, OnSamplerAlgorithm, SamplerBatch
from fluxguide.algos.registry import AlgorithmSpec, Stage, budgets
from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.rewards.base import (
    NotDifferentiableError,
    call_reward,
    describe_reward,
    require_differentiable,
)
from fluxguide.sampling.conditioning import model_velocity
from fluxguide.sampling.denoise import FluxModel, GuidanceFn, GuidanceScale, denoise, scale_at

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""Latents -> images ``(B, 3, H, W)`` in [0, 1], differentiable."""


@dataclass
class RewardGradientConfig:
    """Settings of one reward-gradient update.

    Attributes:
        num_steps: sampling steps per trajectory.
        guidance_scale: scale of the policy's correction (``pred + scale * correction``).
        grad_last_k: backpropagate through the last ``K`` steps only (``None``: all steps).
        random_k: draw ``K`` uniformly from ``[1, grad_last_k or num_steps]`` at every update.
        gradient_checkpointing: recompute step activations in the backward pass.
        control_cost: weight of the control cost / KL term (0 disables it).
        init_kl: weight of the KL to a reference policy (the initial one; :class:`RewardGradient`'s
            ``reference``): the same Gaussian-step KL as the control cost, on the difference of the two
            policies' corrections (0 disables it).
        reward_target: clip the reward at this value in the loss (``None``: no target).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        reward_shift: score each image translated by a random offset of up to this many pixels per axis
            (see :func:`random_translate`); 0 scores the image as sampled.
    """

    num_steps: int = 20
    guidance_scale: float = 1.0
    grad_last_k: int | None = None
    random_k: bool = False
    gradient_checkpointing: bool = True
    control_cost: float = 0.0
    init_kl: float = 0.0
    reward_target: float | None = None
    max_grad_norm: float | None = 1.0
    reward_shift: int = 0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.grad_last_k is not None and not 1 <= self.grad_last_k <= self.num_steps:
            raise ValueError(
                f"grad_last_k must be in [1, num_steps={self.num_steps}] or None (all steps), got {self.grad_last_k}"
            )
        if self.control_cost < 0:
            raise ValueError(f"control_cost must be >= 0, got {self.control_cost}")
        if self.init_kl < 0:
            raise ValueError(f"init_kl must be >= 0, got {self.init_kl}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.reward_shift < 0:
            raise ValueError(f"reward_shift must be >= 0 pixels, got {self.reward_shift}")


@dataclass
class RewardGradientOutput:
    """One forward pass: named loss terms (tensors with a graph), metrics, final images and rewards."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float]
    images: torch.Tensor
    rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def draw_truncation(
    num_steps: int, grad_last_k: int | None, random_k: bool, generator: torch.Generator | None = None
) -> int:
    """The number of differentiated steps ``K`` of one update (fixed, or uniform in ``[1, K_max]``)."""
    k_max = num_steps if grad_last_k is None else grad_last_k
    if not random_k:
        return k_max
    return int(torch.randint(1, k_max + 1, (1,), generator=generator).item())


def reward_terms(
    rewards: torch.Tensor, control: torch.Tensor | None, control_cost: float, reward_target: float | None,
    kl: torch.Tensor | None = None, init_kl: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The named loss terms from per-sample rewards ``(B,)``, control costs ``(B,)`` and KLs to the
    reference policy ``(B,)``."""
    clipped = rewards if reward_target is None else rewards.clamp(max=reward_target)
    losses = {"loss_reward": -clipped.float().mean()}
    if control is not None and control_cost > 0:
        losses["loss_control"] = control_cost * control.mean()
    if kl is not None and init_kl > 0:
        losses["loss_init_kl"] = init_kl * kl.mean()
    return losses


def reward_gradient_loss(
    model: FluxModel, decode: Decoder, policy: GuidanceFn, reward: RewardFn, cond: Conditioning, noise: torch.Tensor,
    timesteps: Sequence[float], config: RewardGradientConfig, *, guidance: float | None = None,
    generator: torch.Generator | None = None, reference: GuidanceFn | None = None,
) -> RewardGradientOutput:
    """Full-trajectory reward gradient: sample with a graph through the last ``K`` steps and score.

    Args:
        model: the base velocity model (BFL signature; a backbone or a CFG wrapper around one).
        decode: latents -> images ``(B, 3, H, W)`` in [0, 1], differentiable (``backbone.decode``).
        policy: the guidance model being trained.
        reward: ``reward(images, prompts) -> (B,)``, differentiable.
        cond: the conditioning of the ``B`` samples (``cond.prompts`` go to the reward).
        noise: initial latents ``(B, seq, C)``.
        timesteps: the schedule (``num_steps + 1`` times).
        config: truncation, checkpointing, control cost, reward target.
        guidance: distilled guidance strength for Flux-dev-like models (``None`` for others).
        generator: draws the random ``K`` when ``config.random_k``.
        reference: the frozen policy of ``config.init_kl`` (its KL is recorded and penalised when given).

    Returns:
        :class:`RewardGradientOutput` with ``losses`` ``{"loss_reward", ["loss_control"], ["loss_init_kl"]}``.
    """
    num_steps = len(timesteps) - 1
    if num_steps != config.num_steps:
        raise ValueError(f"got {num_steps + 1} timesteps but config.num_steps={config.num_steps}")
    k = draw_truncation(num_steps, config.grad_last_k, config.random_k, generator)
    penalise_kl = reference is not None and config.init_kl > 0
    recorder = CorrectionRecorder(policy, config.guidance_scale, num_steps,
                                  cost_grad_all_steps=config.control_cost > 0 or penalise_kl,
                                  reference=reference, kl_grad=penalise_kl, cost_grad=config.control_cost > 0)
    latents = denoise(
        model, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, timesteps,
        guidance=guidance, guidance_model=recorder, guidance_scale=config.guidance_scale,
        guidance_requires_grad=True, grad_last_k=k, gradient_checkpointing=config.gradient_checkpointing,
    )
    return score(decode(latents), recorder.per_sample_cost(), reward, cond, config, generator,
                 kl=recorder.per_sample_kl(), grad_last_k=float(k))


def score(
    images: torch.Tensor,
    control: torch.Tensor,
    reward: RewardFn,
    cond: Conditioning,
    config: RewardGradientConfig,
    generator: torch.Generator | None,
    kl: torch.Tensor | None = None,
    **extra: float,
) -> RewardGradientOutput:
    """Score decoded ``images`` (randomly translated by ``config.reward_shift``) and build the loss terms.

    ``control`` is the per-sample control cost ``(B,)``, ``kl`` the per-sample KL to the reference policy
    ``(B,)`` or ``None``; ``extra`` metrics follow the reward and control ones.
    """
    # Checked before reward_terms clamps at the reward target (an inf would be clamped to the target and train on).
    rewards = call_reward(reward, random_translate(images, config.reward_shift, generator), cond.prompts)
    if images.requires_grad and not rewards.requires_grad:  # e.g. it left torch, or computed under no_grad
        raise NotDifferentiableError(
            f"{describe_reward(reward)} returned rewards with no gradient (they do not depend on the images through "
            "torch operations), so reward gradient cannot train on it: set differentiable = False on it and use "
            "PPO / GRPO, or compute the reward with differentiable torch operations")
    losses = reward_terms(rewards, control, config.control_cost, config.reward_target, kl, config.init_kl)
    metrics = {
        "reward_mean": float(rewards.detach().mean()),
        "reward_std": float(rewards.detach().std()) if rewards.numel() > 1 else 0.0,
        "control_cost": float(control.detach().mean()),
        **({"init_kl": float(kl.detach().mean())} if kl is not None else {}),
        **extra,
    }
    return RewardGradientOutput(losses=losses, metrics=metrics, images=images.detach(), rewards=rewards.detach())


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by its own random integer offset in ``[-max_shift, max_shift]^2`` (zero fill).

    Scoring randomly translated images optimises the reward's expectation over translations (Athalye et al.
    2018, "expectation over transformation"): a correction that only fools the reward model at one alignment,
    e.g. a texture locked to the patch grid of a ViT reward, stops paying, while real content keeps its score.
    Differentiable (a crop of a zero-padded copy).
    """
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def predicted_clean_latent(
    img: torch.Tensor, pred: torch.Tensor, correction: torch.Tensor, timestep: torch.Tensor | float, scale: float
) -> torch.Tensor:
    """``x0 = img - t * (pred + scale * correction)``: one Euler step from ``t`` to 0 with the guided velocity.

    ``timestep`` is a float or a ``(B,)`` / ``(B, 1)`` tensor; computed in float32.
    """
    t = torch.as_tensor(timestep, dtype=torch.float32, device=img.device)
    if t.ndim > 0:
        t = t.reshape(-1, 1, 1)
    return img.float() - t * (pred.float() + scale * correction.float())


def one_step_reward_loss(
    model: FluxModel, decode: Decoder, policy: GuidanceFn, reward: RewardFn, cond: Conditioning, noise: torch.Tensor,
    timesteps: Sequence[float], config: RewardGradientConfig, *, step_idx: int | None = None,
    guidance: float | None = None, generator: torch.Generator | None = None, reference: GuidanceFn | None = None,
) -> RewardGradientOutput:
    """One-step reward gradient: reward of the predicted clean image at a sampled step.

    Runs the guided sampler without grad to step ``i`` (uniform over the steps unless ``step_idx`` is given),
    then scores ``decode(img - t_i * (pred + scale * policy(...)))``; only the policy's output at step ``i``
    carries a gradient. The control cost is that step's.
    """
    num_steps = len(timesteps) - 1
    if step_idx is None:
        step_idx = int(torch.randint(0, num_steps, (1,), generator=generator).item())
    if not 0 <= step_idx < num_steps:
        raise ValueError(f"step_idx must be in [0, {num_steps - 1}], got {step_idx}")
    img = noise
    if step_idx > 0:
        img = denoise(
            model, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, list(timesteps[: step_idx + 1]),
            guidance=guidance, guidance_model=policy, guidance_scale=_prefix_scale(config.guidance_scale, step_idx),
        )
    t = float(timesteps[step_idx])
    t_vec = torch.full((img.shape[0],), t, device=img.device, dtype=img.dtype)  # the policy's time input too
    with torch.no_grad():
        pred = model_velocity(model, img, t_vec, cond, guidance)
    correction = policy(img, pred, cond.txt, cond.vec, t_vec, step_idx)
    scale = scale_at(config.guidance_scale, step_idx, num_steps)
    x0 = predicted_clean_latent(img, pred, correction, t, scale)
    control = scale**2 * correction.float().square().flatten(1).mean(1)
    kl = None if reference is None else scale**2 * step_kl(correction if config.init_kl > 0 else correction.detach(),
                                                           reference, img, pred, cond.txt, cond.vec, t_vec, step_idx)
    return score(decode(x0), control, reward, cond, config, generator, kl=kl, step_idx=float(step_idx))


def _prefix_scale(guidance_scale: GuidanceScale, num_steps: int) -> GuidanceScale:
    """The scale schedule of the first ``num_steps`` steps (a per-step list is cut to that length)."""
    if isinstance(guidance_scale, (list, tuple)):
        return list(guidance_scale)[:num_steps]
    return guidance_scale


class RewardGradient(OnSamplerAlgorithm):
    """Reward-gradient updates of a guidance policy on a backbone against a differentiable reward.

    Args:
        backbone: the base model (``encode``, ``decode``, ``noise``, ``schedule``).
        policy: the guidance model being trained; under ``torchrun`` it is wrapped for data parallelism
            (:func:`fluxguide.distributed.data_parallel`) unless it already is.
        reward: a differentiable reward module (checked with :func:`require_differentiable`).
        optimizer: over the policy's parameters.
        config: see :class:`RewardGradientConfig`.
        cfg_scale: classifier-free guidance of the base model during training (1 = none).
        one_step: use the one-step variant instead of the full trajectory.
        decode: latents -> images for the reward (default ``backbone.decode``), e.g. a decoder whose final
            clamp to [0, 1] passes gradients straight through (``backbone.straight_through_decoder()``).
        reference: a frozen policy (typically a copy of the initial one) that ``config.init_kl`` keeps the
            policy near; its KL is logged as ``init_kl`` whenever it is given.

    Example::

        algo = RewardGradient(world, policy, make_reward("shapes-clip", world=world), optimizer,
                              RewardGradientConfig(grad_last_k=4, control_cost=0.1))
        metrics = algo.update(prompts, generator)

    One update (:meth:`~fluxguide.algos.common.Algorithm.update`) returns ``loss``, its terms ``loss_*``,
    ``reward_mean`` / ``reward_std`` (the std pooled exactly over every rank's samples), ``control_cost``,
    ``init_kl`` (with a reference), ``grad_last_k`` (or ``step_idx`` one-step) and ``grad_norm``, and raises
    :class:`~fluxguide.algos.common.NonFiniteLossError` (the policy unchanged) on a NaN/inf loss or gradient.
    A checkpoint saves ``modules = {"policy": policy}`` (the plain module) and ``optimizers = {"policy":
    optimizer}``.
    """

    name = "reward-gradient"
    advice = "Lower the learning rate or the guidance scale, or check the reward on these images"
    #: The metrics of :meth:`update` that describe the training batch (the scripts log them under ``train/``).
    train_metrics: tuple[str, ...] = ("reward_mean", "reward_std", "control_cost", "init_kl", "grad_last_k")

    def __init__(
        self,
        backbone: Backbone,
        policy: nn.Module,
        reward: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RewardGradientConfig | None = None,
        *,
        cfg_scale: float = 1.0,
        one_step: bool = False,
        decode: Decoder | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        require_differentiable(reward)
        self.config = config or RewardGradientConfig()
        self.one_step = one_step
        if reference is not None:
            reference = reference.eval().requires_grad_(False)
        self.reference = reference
        super().__init__(backbone, policy, reward, optimizer, num_steps=self.config.num_steps, cfg_scale=cfg_scale,
                         decode=decode)

    def forward_pass(self, batch: SamplerBatch) -> RewardGradientOutput:
        """The loss terms, metrics, images and rewards of one guided sampling of ``batch`` (with a graph)."""
        fn = one_step_reward_loss if self.one_step else reward_gradient_loss
        return fn(
            self.model, self.decode, self.policy, self.reward, batch.cond, batch.noise, self.timesteps, self.config,
            guidance=self.backbone.default_guidance, generator=batch.generator, reference=self.reference,
        )

    def loss(self, batch: SamplerBatch) -> LossOutput:
        """The reward-gradient loss terms on ``batch`` (one sample per prompt)."""
        self.policy.train()
        out = self.forward_pass(batch)
        return LossOutput(out.losses, out.metrics, count=len(batch.prompts), pooled_std={"reward_std": "reward_mean"})


_SMOKE = ("--batch-size", "2", "--total-updates", "2")

SPECS = (AlgorithmSpec(
    "reward-gradient", "backpropagate a differentiable reward through the sampler (affine schedule)",
    (Stage("train_reward_gradient.py", budgets=budgets(_SMOKE, 320)),), RewardGradient, main_job=True, minutes=3.0),)
