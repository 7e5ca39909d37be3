"""Adjoint Matching for guidance policies: reward fine-tuning as a regression of the control onto the lean adjoint.

Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with
Memoryless Stochastic Optimal Control", ICLR 2025 (arXiv 2409.08861). The goal is the reward-tilted distribution
``p*(x) ∝ p_base(x) exp(lambda r(x))``; with the *memoryless* noise schedule it is the solution of the stochastic
optimal control problem (the paper's SOC problem) ``min_u E[ int 0.5 ||u||^2 dtau - lambda r(X_1)]`` over the
control-affine SDE ``dX = (b(X, tau) + sigma(tau) u(X, tau)) dtau + sigma(tau) dB``. One update (the paper's
Algorithm 1, "Adjoint Matching"):

1. sample trajectories of the *current* controlled memoryless SDE without grad
   (:func:`fluxguide.sampling.memoryless.memoryless_step`, the base velocity plus the policy's correction);
2. integrate the **lean adjoint ODE** backwards (the paper's lean adjoint, Eq. "d/dtau a = -a^T grad_x b(X, tau),
   a(1) = -grad r(X_1)", with ``lambda r`` for ``r``): ``a_N = -lambda grad r(x_N)``, then through the *base* drift
   only (the control terms of the full adjoint are dropped, which is what makes it lean), by vector-Jacobian
   products through the base model (:func:`lean_adjoint`);
3. regress the control on ``-sigma a`` (the paper's adjoint matching loss
   ``L(u) = E[ int 0.5 ||u(X_tau, tau) + sigma(tau) a(tau)||^2 dtau ]``) on a random subset of the steps
   (:func:`adjoint_matching_loss`).

**Time and the correction.** fluxguide's ``t = 1 - tau`` (noise at ``t = 1``) and its velocity is the paper's with
the sign flipped. The policy's correction ``c`` enters as ``pred_used = pred + g c``, which is the control
``u = -2 g c / sigma(t)`` (:func:`fluxguide.sampling.memoryless.correction_to_control`). The loss is written in
the correction's units: with the discrete step ``x' = A x + B (v + g c) + std xi``, the control displacement is
``B g c = sigma u dtau``, the step's KL is ``||B g c||^2 / (2 std^2)`` and the first-order optimum of
``sum KL - lambda r`` is ``g c* = -std^2 a' / B`` with ``a'`` the adjoint *after* the step (``-> sigma^2 a / 2``
as the step shrinks: ``u* = -sigma a``, the paper's fixed point). So
``||u + sigma a||^2 dtau = w(t) ||g c - g c*||^2`` with the paper's weight ``w = 4 dtau / sigma(t)^2`` (0 at pure
noise, large near data); ``weighting="velocity"`` uses ``w = dtau`` instead (the flow-matching weighting). Both
have the same minimiser (the conditional mean of the target at each state), the loss is a mean over elements.
The trained correction is a fine-tuned velocity: the deterministic Euler sampler (the harness's evaluation) with
it samples the same tilted distribution.

**Relative to a reference policy** (RL from a distilled start). The paper fine-tunes a *pretrained* model: its base
process is the model being fine-tuned. A guidance policy distilled from CFG is that pretrained model here, so with
a ``reference`` (the frozen initial policy) the base drift is the base model's velocity *plus the reference's
correction*, the control is ``c - c_ref``, and the target is ``p_ref(x) exp(lambda r(x))``, the tilt of the
distribution the initial policy samples (the control cost is then the KL to it). Without a reference the fixed
point is the tilt of the base model's distribution, whatever policy the training starts from, so a distilled
start would be unlearned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from fluxguide.algos.common import LossOutput
from fluxguide.algos.on_sampler import Decoder, OnSamplerAlgorithm, SamplerBatch
from fluxguide.algos.registry import AlgorithmSpec, Stage, budgets
from fluxguide.algos.reward_gradient import RewardFn
from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.rewards.base import call_reward, require_differentiable
from fluxguide.sampling.conditioning import model_velocity
from fluxguide.sampling.denoise import FluxModel, GuidanceFn
from fluxguide.sampling.memoryless import (
    correction_to_control,
    memoryless_coefficients,
    memoryless_sigma,
    memoryless_step,
)

__all__ = [
    "AdjointBatch",
    "AdjointMatching",
    "AdjointMatchingConfig",
    "Trajectory",
    "adjoint_matching_loss",
    "correction_targets",
    "lean_adjoint",
    "sample_memoryless",
]

WEIGHTINGS = ("paper", "velocity")


@dataclass
class AdjointMatchingConfig:
    """Settings of one Adjoint Matching update.

    Attributes:
        num_steps: sampling steps per trajectory.
        reward_scale: ``lambda`` of the tilted target ``p_base exp(lambda r)`` (0: the target is the base).
        guidance_scale: ``g`` of ``pred + g * correction``.
        time_subsample: regress on this many steps drawn at random per update (``None``: every step).
        weighting: ``"paper"`` (``4 dtau / sigma^2``) or ``"velocity"`` (``dtau``), see the module docstring.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
    """

    num_steps: int = 20
    reward_scale: float = 1.0
    guidance_scale: float = 1.0
    time_subsample: int | None = None
    weighting: str = "paper"
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.reward_scale < 0:
            raise ValueError(f"reward_scale must be >= 0, got {self.reward_scale}")
        if self.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be > 0, got {self.guidance_scale}")
        if self.time_subsample is not None and not 1 <= self.time_subsample <= self.num_steps:
            raise ValueError(
                f"time_subsample must be in [1, num_steps={self.num_steps}] or None (every step), "
                f"got {self.time_subsample}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


@dataclass
class Trajectory:
    """A controlled memoryless trajectory sampled without grad: ``states[k]`` at ``timesteps[k]`` (``N + 1``
    states), the base predictions ``preds[k]`` at the ``N`` steps, and the per-sample control cost ``(B,)``."""

    states: list[torch.Tensor]
    preds: list[torch.Tensor]
    control_cost: torch.Tensor


def _base_velocity(model: FluxModel, img: torch.Tensor, t: float, cond: Conditioning,
                   guidance: float | None) -> torch.Tensor:
    dtype = next((p.dtype for p in model.parameters()), torch.float32) if isinstance(model, nn.Module) else None
    return model_velocity(model, img if dtype is None else img.to(dtype), t, cond, guidance).float()


def _policy(policy: GuidanceFn, img: torch.Tensor, pred: torch.Tensor, cond: Conditioning, t: float,
            step: int) -> torch.Tensor:
    t_vec = torch.full((img.shape[0],), t, device=img.device, dtype=img.dtype)
    return policy(img, pred, cond.txt, cond.vec, t_vec, step).float()


def _reference(reference: GuidanceFn | None, img: torch.Tensor, pred: torch.Tensor, cond: Conditioning, t: float,
               step: int) -> torch.Tensor | float:
    """The frozen reference policy's correction (``0.0`` without one), differentiable in ``img`` / ``pred``."""
    return 0.0 if reference is None else _policy(reference, img, pred, cond, t, step)


@torch.no_grad()
def sample_memoryless(
    model: FluxModel, policy: GuidanceFn | None, cond: Conditioning, noise: torch.Tensor, timesteps: list[float],
    guidance_scale: float = 1.0, *, guidance: float | None = None, generator: torch.Generator | None = None,
    reference: GuidanceFn | None = None,
) -> Trajectory:
    """Step 1: a trajectory of the controlled memoryless SDE (``policy=None``: the base process).

    The control cost is the paper's ``int 0.5 ||u||^2 dtau`` (the KL of the controlled process to the base one,
    summed over the latent's elements), with ``u = -2 g (c - c_ref) / sigma(t)`` at each step's start (``c_ref``:
    the ``reference`` policy's correction, 0 without one).
    """
    img = noise.float()
    states, preds = [img], []
    cost = torch.zeros(img.shape[0], device=img.device)
    for k, (t, s) in enumerate(itertools.pairwise(timesteps)):
        pred = _base_velocity(model, img, t, cond, guidance)
        used = pred
        if policy is not None:
            correction = _policy(policy, img, pred, cond, t, k)
            used = pred + guidance_scale * correction
            u = correction_to_control(correction - _reference(reference, img, pred, cond, t, k), t, guidance_scale)
            cost = cost + 0.5 * (t - s) * u.square().flatten(1).sum(1)
        img = memoryless_step(img, used, t, s, generator=generator)
        states.append(img)
        preds.append(pred)
    return Trajectory(states=states, preds=preds, control_cost=cost)


def lean_adjoint(
    model: FluxModel, decode: Decoder, reward: RewardFn, cond: Conditioning, states: list[torch.Tensor],
    timesteps: list[float], reward_scale: float, *, guidance: float | None = None,
    reference: GuidanceFn | None = None, guidance_scale: float = 1.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step 2: the lean adjoint ``a_k`` at every state ``x_k`` (``k = 1..N``; ``a_0`` is not needed) and the rewards.

    ``a_N = -lambda grad_x r(decode(x_N))`` (the paper's terminal condition), then backwards through the base
    step ``x_{k+1} = A_k x_k + B_k v(x_k, t_k)`` only (the lean adjoint ODE ``da/dtau = -a^T grad_x b``, discretised
    as the exact adjoint of the discrete base step): ``a_k = A_k a_{k+1} + VJP(B_k v(., t_k), a_{k+1})``. With a
    ``reference`` policy the base velocity is ``v + g c_ref(x, v)``, differentiated through both.

    Returns:
        ``(adjoints, rewards)``: ``adjoints[k]`` pairs with ``states[k]`` (``adjoints[0]``, never used, is zero);
        ``rewards`` ``(B,)`` detached.
    """
    n = len(timesteps) - 1
    with torch.enable_grad():
        x = states[-1].detach().requires_grad_(True)
        rewards = call_reward(reward, decode(x), cond.prompts)
        (grad,) = torch.autograd.grad(rewards.float().sum(), x)
    adjoints = [torch.zeros_like(states[0])] * (n + 1)
    adjoints[n] = -reward_scale * grad.float()
    for k in range(n - 1, 0, -1):
        a_coef, b_coef, _ = memoryless_coefficients(timesteps[k], timesteps[k + 1])
        nxt = adjoints[k + 1]
        with torch.enable_grad():
            x = states[k].detach().requires_grad_(True)
            v = _base_velocity(model, x, timesteps[k], cond, guidance)
            if reference is not None:
                v = v + guidance_scale * _reference(reference, x, v, cond, timesteps[k], k)
            (vjp,) = torch.autograd.grad(v, x, grad_outputs=b_coef * nxt)
        adjoints[k] = a_coef * nxt + vjp.float()
    return adjoints, rewards.detach()


def correction_targets(adjoints: list[torch.Tensor], timesteps: list[float]) -> list[torch.Tensor]:
    """The optimal scaled correction ``g c*_k = -std_k^2 a_{k+1} / B_k`` of each step ``k = 0..N-1``
    (``-> sigma^2 a / 2``, i.e. ``u* = -sigma a``, as the step shrinks)."""
    out = []
    for k, (t, s) in enumerate(itertools.pairwise(timesteps)):
        _, b_coef, std = memoryless_coefficients(t, s)
        out.append(-(std * std / b_coef) * adjoints[k + 1])
    return out


def step_weights(timesteps: list[float], weighting: str) -> torch.Tensor:
    """The weight of each step's regression, normalised to sum to 1: ``4 dtau / sigma(t)^2 = 2 dtau (1 - t) / t``
    (``"paper"``) or ``dtau`` (``"velocity"``)."""
    w = []
    for t, s in itertools.pairwise(timesteps):
        sigma = memoryless_sigma(t)
        w.append((t - s) * (4.0 / sigma**2 if weighting == "paper" else 1.0))
    weights = torch.tensor(w, dtype=torch.float64)
    if weights.sum() == 0:  # one step from pure noise: sigma = inf, the paper's weight is 0
        weights = torch.ones_like(weights)
    return (weights / weights.sum()).float()


def adjoint_matching_loss(
    policy: GuidanceFn, cond: Conditioning, trajectory: Trajectory, targets: list[torch.Tensor],
    timesteps: list[float], steps: list[int], guidance_scale: float, weighting: str = "paper",
    reference: GuidanceFn | None = None,
) -> torch.Tensor:
    """Step 3: the adjoint matching loss on the ``steps`` subset, an unbiased estimate of the all-step loss
    ``sum_k w_k mean((g (c_k - c_ref,k) - g c*_k)^2)`` (see the module docstring; ``= int ||u + sigma a||^2 dtau``
    up to a constant for ``weighting="paper"``; ``c_ref = 0`` without a ``reference``)."""
    weights = step_weights(timesteps, weighting)
    n = len(timesteps) - 1
    terms = []
    for k in steps:
        correction = _policy(policy, trajectory.states[k], trajectory.preds[k], cond, timesteps[k], k)
        with torch.no_grad():
            ref = _reference(reference, trajectory.states[k], trajectory.preds[k], cond, timesteps[k], k)
        residual = guidance_scale * (correction - ref) - targets[k]
        terms.append(weights[k] * residual.square().mean())
    return torch.stack(terms).sum() * (n / len(steps))


@dataclass
class AdjointBatch:
    """The data of one Adjoint Matching update: the sampled trajectories, their regression targets, the final
    rewards, the RMS of the final adjoint, and the steps the loss regresses on."""

    batch: SamplerBatch
    trajectory: Trajectory
    targets: list[torch.Tensor]
    rewards: torch.Tensor
    adjoint_norm: float
    steps: list[int]


class AdjointMatching(OnSamplerAlgorithm):
    """Adjoint Matching updates of a guidance policy on a backbone against a differentiable reward.

    Args:
        backbone: the base model (``encode``, ``forward``, ``decode``, ``noise``, ``schedule``).
        policy: the guidance model (the control); wrapped for data parallelism under ``torchrun``.
        reward: ``reward(images, prompts) -> (B,)``, differentiable in the pixels.
        optimizer: over the policy's parameters.
        config: see :class:`AdjointMatchingConfig`.
        cfg_scale: classifier-free guidance of the base model (1 = none); the tilt is of the CFG sampler.
        decode: latents -> images for the reward (default ``backbone.decode``).
        reference: a frozen policy (the initial one) whose sampler is the base process: the target is then the
            tilt of the distribution it samples and the control cost the KL to it (see the module docstring).

    Example::

        algo = AdjointMatching(world, policy, make_reward("shapes-clip", world=world), optimizer,
                               AdjointMatchingConfig(reward_scale=10.0, time_subsample=5))
        metrics = algo.update(prompts, generator)  # reward_mean, reward_std, control_cost, loss, grad_norm

    One update returns ``loss`` (= ``loss_adjoint``), ``reward_mean`` / ``reward_std`` (of the sampled
    trajectories' final images, std pooled over ranks), ``control_cost`` (``int 0.5 ||u||^2 dtau``, the KL to
    the base process), ``adjoint_norm`` (RMS of ``a`` at the final state) and ``grad_norm``.
    """

    name = "adjoint-matching"
    loss_name = "adjoint matching loss"
    advice = "Lower the learning rate or --reward-scale, or check the reward's gradient on these images"

    def __init__(
        self, backbone: Backbone, policy: nn.Module, reward: RewardFn, optimizer: torch.optim.Optimizer,
        config: AdjointMatchingConfig | None = None, *, cfg_scale: float = 1.0, decode: Decoder | None = None,
        reference: GuidanceFn | None = None,
    ) -> None:
        if isinstance(reward, nn.Module):
            require_differentiable(reward)
        self.config = config or AdjointMatchingConfig()
        self.reference = reference
        super().__init__(backbone, policy, reward, optimizer, num_steps=self.config.num_steps, cfg_scale=cfg_scale,
                         decode=decode)

    def collect(self, prompts: list[str], generator: torch.Generator | None = None) -> AdjointBatch:
        """Sample memoryless trajectories for ``prompts`` without grad and solve the lean adjoint on them."""
        batch = super().collect(prompts, generator)
        cfg, ts, guidance = self.config, self.timesteps, self.backbone.default_guidance
        self.policy.eval()
        traj = sample_memoryless(self.model, self.policy, batch.cond, batch.noise, ts, cfg.guidance_scale,
                                 guidance=guidance, generator=generator, reference=self.reference)
        adjoints, rewards = lean_adjoint(self.model, self.decode, self.reward, batch.cond, traj.states, ts,
                                         cfg.reward_scale, guidance=guidance, reference=self.reference,
                                         guidance_scale=cfg.guidance_scale)
        n = cfg.num_steps
        steps = list(range(n)) if cfg.time_subsample is None else sorted(
            torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")
            [: cfg.time_subsample].tolist())
        return AdjointBatch(batch, traj, correction_targets(adjoints, ts), rewards,
                            float(adjoints[-1].square().mean().sqrt()), steps)

    def loss(self, data: AdjointBatch) -> LossOutput:
        """The regression of the policy's corrections onto the adjoint targets, on the chosen steps."""
        cfg = self.config
        self.policy.train()
        loss = adjoint_matching_loss(self.policy, data.batch.cond, data.trajectory, data.targets, self.timesteps,
                                     data.steps, cfg.guidance_scale, cfg.weighting, reference=self.reference)
        rewards = data.rewards.float()
        metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1
                   else 0.0, "control_cost": float(data.trajectory.control_cost.mean()),
                   "adjoint_norm": data.adjoint_norm}
        return LossOutput({"loss_adjoint": loss}, metrics, count=len(data.batch.prompts),
                          pooled_std={"reward_std": "reward_mean"})


_SMOKE = ("--batch-size", "2", "--total-updates", "2", "--time-subsample", "2")

SPECS = (AlgorithmSpec(
    "adjoint-matching", "regress the control onto the lean adjoint (Domingo-Enrich et al., 2025)",
    (Stage("train_adjoint_matching.py", budgets=budgets(_SMOKE, 800)),), AdjointMatching),)
