"""The denoising trajectory as a batched MDP: one torch core under the Gymnasium and TorchRL faces.

An episode is one sampling trajectory of ``num_steps`` steps over a batch of ``B`` prompts (docs/design.md,
"envs"). The state at step ``i`` is the latent ``img`` at time ``t_i`` together with the base model's
prediction ``pred`` there; the action ``a`` is the guidance correction, shaped like ``pred``, and the step is

* ODE mode (Flux's deterministic sampler): ``img' = euler_step(img, pred + g a, t_i, t_{i+1})``;
* SDE mode (marginal-preserving, Flow-GRPO Eq. 9): ``img' = sde_mean(img, pred + g a, t_i, t_{i+1})``, and
  the observation publishes ``sde_std`` = :func:`fluxguide.sampling.sde_action_std`, the std (in action
  units) of the Gaussian policy that turns this deterministic step into the SDE step. The env adds no
  noise itself: after :meth:`GuidanceCore.reset` the only randomness is the policy's. With ``sde_window``
  only the steps of the window are SDE steps; the others are Euler steps that publish ``sde_std = 0`` (a
  deterministic action), as Flow-GRPO-Fast (Liu et al. 2025) and MixGRPO (Li et al. 2025) explore.

The reward is 0 before the last step (minus the optional control cost); at the last step it is the reward
module on ``backbone.decode(final latent)``. Exactly as :func:`fluxguide.sampling.denoise` computes it,
``pred + g a`` is formed first and then stepped, so a zero action reproduces the base sampler bit for bit.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fluxguide import keys
from fluxguide.backbones.base import Backbone, Conditioning, check_num_steps
from fluxguide.backbones.prompt_check import check_backbone_prompts
from fluxguide.backbones.registry import RewardLike, build_reward
from fluxguide.envs.actions import DEFAULT_ODE_MAX_ACTION, SDE_MAX_ACTION_STDS, check_action, finite
from fluxguide.envs.prompts import PromptSource, PromptSourceLike, resolve_prompts
from fluxguide.errors import UserError
from fluxguide.rewards.base import call_reward
from fluxguide.sampling.conditioning import model_velocity
from fluxguide.sampling.denoise import GuidanceScale, scale_at
from fluxguide.sampling.sde_actions import sde_action_std
from fluxguide.sampling.steps import euler_step, sde_mean

Mode = Literal["ode", "sde"]


@dataclass
class StepResult:
    """What :meth:`GuidanceCore.step` returns (torch tensors on the core's device).

    Attributes:
        observation: ``img``, ``pred``, ``txt``, ``vec``, ``t``, ``step`` (and ``sde_std`` in SDE mode).
        reward: ``(B,)`` float32.
        terminated: whether this step ended the episode (all ``B`` trajectories end together).
        info: ``prompts`` every step; at the end also ``terminal_reward``, ``control_cost``,
            ``reward_components``, ``verifier`` (shapes world) and ``final_images``.
    """

    observation: dict[str, torch.Tensor]
    reward: torch.Tensor
    terminated: bool
    info: dict[str, Any] = field(default_factory=dict)


class SDEWindowError(UserError, ValueError):
    """An ``sde_window`` that is not a window of the episode's steps, or one outside SDE mode."""


def check_sde_window(window: tuple[int, int] | None, mode: Mode, num_steps: int) -> tuple[int, int]:
    """``window`` as ``(start, stop)`` with ``0 <= start < stop <= num_steps`` (``None``: every step).

    Raises:
        SDEWindowError: naming the bad value, or a window outside SDE mode.
    """
    if window is None:
        return 0, num_steps
    if mode != "sde":
        raise SDEWindowError(f"sde_window {window!r} needs SDE mode (ODE mode has no SDE steps): drop it or use "
                             "mode 'sde'")
    try:
        start, stop = (operator.index(v) for v in window)
    except (TypeError, ValueError):
        raise SDEWindowError(f"sde_window must be (start, stop), two integer step indices, got {window!r}") from None
    if not 0 <= start < stop <= num_steps:
        raise SDEWindowError(f"sde_window {window!r} must satisfy 0 <= start < stop <= num_steps = {num_steps} "
                             "(the SDE steps are start..stop-1)")
    return start, stop


class GuidanceCore:
    """The batched denoising MDP in torch; the Gymnasium and TorchRL envs are thin faces over it.

    Args:
        backbone: the base model (:class:`fluxguide.backbones.Backbone`); the core runs on its device.
        reward: a reward module (``forward(images, prompts) -> (B,)``), a registry name (built for the backbone
            by :func:`fluxguide.backbones.registry.build_reward`; ``None``: the backbone's
            :meth:`~fluxguide.backbones.Backbone.default_reward`, ``"shapes-clip"`` in the shapes world), or a
            callable ``fn(images, prompts) -> (B,)``.
        prompts: a list of prompts, a text file with one prompt per line, or ``"shapes-train"`` /
            ``"shapes-heldout"``; each reset draws from it uniformly with the seeded generator.
        batch_size: trajectories per episode ``B``.
        num_steps: sampling steps per episode, >= 1 (``None``: the backbone's default); the times are
            ``backbone.schedule(num_steps)``.
        guidance_scale: ``g`` in ``pred + g a``: a float, one float per step, or ``step -> float``.
        max_action: actions are clipped to ``[-max_action, max_action]`` (the finite bound RL libraries
            need). Default: 10 in ODE mode; in SDE mode 6 times the largest ``sde_std`` (or 10 if larger).
        mode: ``"ode"`` (Euler) or ``"sde"`` (marginal-preserving drift; the policy supplies the noise).
        noise_level: ``a`` of the SDE's ``sigma_t = a sqrt(t / (1 - t))`` (SDE mode only, > 0).
        sde_window: ``(start, stop)``: in SDE mode, only steps ``start <= i < stop`` are SDE steps; the others
            are the Euler steps of ODE mode, with ``sde_std = 0`` and no control cost (the policy's action is
            its mean there, so it adds nothing to log-probs). ``None``: every step.
        control_cost: coefficient ``beta`` of the per-step penalty subtracted from the reward. ODE mode:
            ``beta * mean(a^2)`` over the ``seq * C`` elements (squared action units, independent of the
            resolution). SDE mode: ``beta * KL``, the exact KL in nats (summed over elements) of the guided
            SDE step to the base sampler's step, ``||k u||^2 / (2 sde_step_std^2) = ||u||^2 / (2 sde_std^2)``
            with ``k`` from :func:`fluxguide.sampling.sde_action_coefficient` and ``u`` the policy's mean
            when the caller passes it (``step(action, loc=...)``; the TorchRL env reads ``loc`` from the
            tensordict), else the action. ``beta = 1`` in SDE mode is KL-regularised RL,
            ``max E[R] - KL(p_policy || p_base)`` over whole trajectories. (Without ``loc``, a sampled
            action ``loc + sde_std * eps`` costs the KL plus ``seq * C / 2`` nats in expectation: the
            SDE's own noise energy; pass the mean.)
        cfg_scale: classifier-free guidance of the base prediction (default: the backbone's
            ``default_cfg_scale``; 1 = off). ``pred`` is then the CFG prediction.
        samples_per_prompt: ``k`` consecutive trajectories share a prompt (``B`` must be a multiple of
            ``k``), for per-prompt advantage normalisation.
        shared_group_noise: the ``k`` trajectories of a group also start from the same initial noise, so
            their rewards differ only through the policy's (or the SDE's) noise: common random numbers for
            the per-prompt advantage, as DanceGRPO (Xue et al. 2025) does. Needs a stochastic policy.
        reward_kwargs: the reward's options when ``reward`` is a name (they win over what the backbone gives).
        verify: run the backbone's verifier (:attr:`Backbone.verifier`) on the final images and report it in ``info``
            (default: on when the backbone has one).
    """

    def __init__(
        self,
        backbone: Backbone,
        reward: RewardLike | None = None,
        prompts: PromptSourceLike = "shapes-train",
        *,
        batch_size: int = 1,
        num_steps: int | None = None,
        guidance_scale: GuidanceScale = 1.0,
        max_action: float | None = None,
        mode: Mode = "ode",
        noise_level: float = 0.7,
        sde_window: tuple[int, int] | None = None,
        control_cost: float = 0.0,
        cfg_scale: float | None = None,
        samples_per_prompt: int = 1,
        shared_group_noise: bool = False,
        reward_kwargs: Mapping[str, Any] | None = None,
        verify: bool | None = None,
    ) -> None:
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a fluxguide Backbone, got {type(backbone).__name__}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(samples_per_prompt, (int, np.integer)) or samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be an integer >= 1, got {samples_per_prompt!r}")
        if batch_size % samples_per_prompt:
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of samples_per_prompt={samples_per_prompt}: "
                f"each prompt fills a group of {samples_per_prompt} consecutive trajectories"
            )
        if mode not in ("ode", "sde"):
            raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
        check_num_steps(num_steps)  # 0 or a negative count is refused, never replaced by the default
        self.backbone = backbone
        self.batch_size = int(batch_size)
        self.samples_per_prompt = int(samples_per_prompt)
        self.shared_group_noise = bool(shared_group_noise)
        self.mode: Mode = mode
        self.noise_level = finite("noise_level", noise_level)
        if mode == "sde" and self.noise_level <= 0:
            raise ValueError(f"SDE mode needs noise_level > 0, got {noise_level}; use mode='ode' for the deterministic sampler")
        self.control_cost = finite("control_cost", control_cost)
        if self.control_cost < 0:
            raise ValueError(f"control_cost must be >= 0 (it is subtracted from the reward), got {control_cost}")
        self.prompt_source = PromptSource(prompts)
        # Every prompt the env may draw must be one the backbone can encode (a world's grammar, a length
        # limit): refused here, before the reward loads and any step runs, not at the last step.
        named = os.fspath(prompts) if isinstance(prompts, (str, os.PathLike)) else None  # a prompt file or set
        check_backbone_prompts(backbone, self.prompt_source.prompts, source=named,
                               where=f"prompts={named!r}" if named is not None else None)
        self.reward = build_reward(reward, backbone, **dict(reward_kwargs or {}))
        self.verify = backbone.verifier is not None if verify is None else bool(verify)
        if self.verify and backbone.verifier is None:
            raise ValueError(f"verify=True but {type(backbone).__name__} has no verifier; pass verify=False")

        self.timesteps: list[float] = list(backbone.schedule(num_steps))
        self.num_steps = len(self.timesteps) - 1
        self.scales = [
            finite(f"guidance_scale at step {i}", scale_at(guidance_scale, i, self.num_steps))
            for i in range(self.num_steps)
        ]
        pairs = list(zip(self.timesteps[:-1], self.timesteps[1:]))
        window = check_sde_window(sde_window, mode, self.num_steps)  # refuses a window in ODE mode too
        self.sde_window: tuple[int, int] | None = window if mode == "sde" else None
        if mode == "sde":
            start, stop = window
            self.sde_stds = [sde_action_std(tc, tp, self.noise_level, g) if start <= i < stop else 0.0
                             for i, ((tc, tp), g) in enumerate(zip(pairs, self.scales))]
            # KL(N(m + k u, s^2 I) || N(m, s^2 I)) = ||k u||^2 / (2 s^2) with s = sde_step_std = |k| sde_std
            # (fluxguide.sampling.sde_actions), i.e. ||u||^2 / (2 sde_std^2): nats, summed over the seq * C elements.
            self._kl_factors = [1.0 / (2.0 * s * s) if s > 0 else 0.0 for s in self.sde_stds]
        else:
            self.sde_stds = []
            self._kl_factors = []
        if max_action is None:
            max_action = DEFAULT_ODE_MAX_ACTION
            if mode == "sde":
                max_action = max(DEFAULT_ODE_MAX_ACTION, SDE_MAX_ACTION_STDS * max(self.sde_stds))
        self.max_action = finite("max_action", max_action)
        if self.max_action <= 0:
            raise ValueError(f"max_action must be > 0, got {max_action}")

        cfg_scale = backbone.default_cfg_scale if cfg_scale is None else finite("cfg_scale", cfg_scale)
        self.cfg_scale = float(cfg_scale)
        self.model: nn.Module = backbone if self.cfg_scale == 1.0 else backbone.with_cfg(self.cfg_scale)

        self.device = backbone.device
        # Prompts and initial noise come from one CPU generator, so a seed gives the same episode on any
        # device. Until the first seeded reset it starts from fresh entropy (Gymnasium's convention).
        self.generator = torch.Generator("cpu")
        self.generator.seed()
        self.episode_rng_state: torch.Tensor = self.generator.get_state()
        self.latent_shape: tuple[int, int] = tuple(backbone.latent_shape)  # type: ignore[assignment]

        probe = backbone.encode([self.prompt_source.prompts[0]])
        self.txt_shape: tuple[int, int] = tuple(probe.txt.shape[1:])  # type: ignore[assignment]
        self.vec_shape: tuple[int] = tuple(probe.vec.shape[1:])  # type: ignore[assignment]
        self.cond_dtype = probe.txt.dtype

        self.cond: Conditioning | None = None
        self.img: torch.Tensor | None = None
        self.pred: torch.Tensor | None = None
        self.step_idx: int | None = None
        self.final_images: torch.Tensor | None = None
        self._cost_sum: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ state
    @property
    def prompts(self) -> list[str]:
        """The current episode's ``B`` prompts (groups of ``samples_per_prompt`` identical ones)."""
        return [] if self.cond is None else list(self.cond.prompts)

    @property
    def done(self) -> bool:
        """True once the last step ran (until the next reset)."""
        return self.step_idx is not None and self.step_idx >= self.num_steps

    @property
    def num_groups(self) -> int:
        return self.batch_size // self.samples_per_prompt

    def seed(self, seed: int | None) -> None:
        """Seed the generator of prompts and initial noise (``None``: fresh entropy)."""
        if seed is None:
            self.generator.seed()
        else:
            if not isinstance(seed, (int, np.integer)) or seed < 0:
                raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
            self.generator.manual_seed(int(seed))

    # ------------------------------------------------------------------------------------------ reset
    @torch.no_grad()
    def reset(self, seed: int | None = None, prompts: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Start an episode: draw prompts (unless given) and initial noise, and predict at ``t = 1``.

        Args:
            seed: reseed the generator first (``None`` continues its stream).
            prompts: this episode's prompts, one per group (``B / samples_per_prompt`` of them), instead
                of drawing them from the source.

        Returns:
            The first observation and ``info = {"prompts": [...]}``.
        """
        if seed is not None:
            self.seed(seed)
        # Restoring this state into `generator` before a reset redraws this episode (resuming a run whose
        # env had already reset for the next episode when it was checkpointed).
        self.episode_rng_state = self.generator.get_state()
        if prompts is None:
            group_prompts = self.prompt_source.draw(self.num_groups, self.generator)
        else:
            if isinstance(prompts, str) or len(prompts) != self.num_groups:
                got = repr(prompts) if isinstance(prompts, str) else f"{len(prompts)} prompts"
                raise ValueError(
                    f"reset(prompts=...) takes one prompt per group: {self.num_groups} (batch_size "
                    f"{self.batch_size} / samples_per_prompt {self.samples_per_prompt}), got {got}"
                )
            group_prompts = resolve_prompts(list(prompts), unique=False)
            check_backbone_prompts(self.backbone, group_prompts, where="reset(prompts=...)")
        cond = self.backbone.encode(group_prompts)
        if self.samples_per_prompt > 1:
            cond = cond.repeat_interleave(self.samples_per_prompt)
        self.cond = cond
        if self.shared_group_noise:
            noise = self.backbone.noise(self.num_groups, self.generator).repeat_interleave(self.samples_per_prompt, 0)
        else:
            noise = self.backbone.noise(self.batch_size, self.generator)
        self.img = noise.to(device=self.device, dtype=torch.float32)
        self.step_idx = 0
        self.pred = self._predict(self.img, 0)
        self.final_images = None
        self._cost_sum = torch.zeros(self.batch_size, device=self.device) if self.control_cost > 0 else None
        return self.observation(), {"prompts": self.prompts}

    def _predict(self, img: torch.Tensor, i: int) -> torch.Tensor:
        """The base prediction at step ``i``'s time, called exactly as :func:`fluxguide.sampling.denoise` calls it."""
        assert self.cond is not None
        return model_velocity(self.model, img, self.timesteps[i], self.cond, self.backbone.default_guidance)

    def observation(self) -> dict[str, torch.Tensor]:
        """The current observation. ``txt`` and ``vec`` are the same tensor objects all episode long."""
        if self.cond is None or self.step_idx is None:
            raise RuntimeError("the environment has not been reset: call reset() first")
        i = self.step_idx
        b, dev = self.batch_size, self.device
        obs = {
            keys.IMG: self.img,
            keys.PRED: self.pred,
            keys.TXT: self.cond.txt,
            keys.VEC: self.cond.vec,
            keys.T: torch.full((b, 1), self.timesteps[i], dtype=torch.float32, device=dev),
            keys.STEP: torch.full((b, 1), i, dtype=torch.int64, device=dev),
        }
        if self.mode == "sde":
            # The terminal state has no next step and publishes 0.
            std = self.sde_stds[i] if i < self.num_steps else 0.0
            obs[keys.SDE_STD] = torch.full((b, 1), std, dtype=torch.float32, device=dev)
        return obs

    # ------------------------------------------------------------------------------------------- step
    def check_action(self, action: Any, name: str = "action") -> torch.Tensor:
        """Validate an action (tensor or numpy array) and return it as float32 on the core's device
        (:func:`fluxguide.envs.actions.check_action`)."""
        return check_action(action, (self.batch_size, *self.latent_shape), self.device, step=self.step_idx, name=name)

    @torch.no_grad()
    def step(self, action: Any, loc: torch.Tensor | None = None) -> StepResult:
        """Apply the correction ``action`` (``(B, seq, C)``) and advance one sampling step.

        Args:
            action: the guidance correction; clipped to ``[-max_action, max_action]``.
            loc: the policy's mean action, used only for the SDE-mode KL control cost (see the class
                docstring); ``None`` uses the action.

        Raises:
            RuntimeError: before the first reset, or after the last step without a reset.
        """
        if self.step_idx is None:
            raise RuntimeError("step() called before reset(): call reset() to start an episode")
        if self.done:
            raise RuntimeError(
                f"the episode ended at step {self.num_steps} (terminated); call reset() before step() again"
            )
        a = self.check_action(action).clamp(-self.max_action, self.max_action)
        i = self.step_idx
        t_curr, t_prev, g = self.timesteps[i], self.timesteps[i + 1], self.scales[i]
        pred_used = self.pred + g * a
        if self.mode == "sde" and self.sde_stds[i] > 0:
            img = sde_mean(self.img, pred_used, t_curr, t_prev, self.noise_level)
        else:
            img = euler_step(self.img, pred_used, t_curr, t_prev)
        cost = self._control_cost(a, loc, i)
        self.img = img
        self.step_idx = i + 1
        info: dict[str, Any] = {"prompts": self.prompts}
        if self.step_idx < self.num_steps:
            self.pred = self._predict(img, self.step_idx)
            reward = -cost if cost is not None else torch.zeros(self.batch_size, device=self.device)
            return StepResult(self.observation(), reward, False, info)
        # Last step: no prediction at t = 0; the terminal observation carries pred = 0.
        self.pred = torch.zeros_like(img)
        terminal = self._terminal_reward(info)
        reward = terminal - cost if cost is not None else terminal
        if self._cost_sum is not None:
            info["control_cost"] = self._cost_sum
        return StepResult(self.observation(), reward, True, info)

    def _control_cost(self, action: torch.Tensor, loc: torch.Tensor | None, i: int) -> torch.Tensor | None:
        if self.control_cost == 0:
            return None
        if self.mode == "ode":
            cost = self.control_cost * action.square().mean(dim=(1, 2))
        else:
            u = action if loc is None else self.check_action(loc, name="loc")
            cost = self.control_cost * self._kl_factors[i] * u.square().sum(dim=(1, 2))
        assert self._cost_sum is not None
        self._cost_sum = self._cost_sum + cost
        return cost

    def _terminal_reward(self, info: dict[str, Any]) -> torch.Tensor:
        images = self.backbone.decode(self.img).float()
        prompts = self.prompts
        values = call_reward(self.reward, images, prompts).detach().to(device=self.device)
        self.final_images = images
        info["terminal_reward"] = values
        info["final_images"] = images
        components = getattr(self.reward, "last_components", None)
        if components:
            info["reward_components"] = {k: v.detach().float() for k, v in components.items()}
        if self.verify:
            result = self.backbone.verifier(images.detach().cpu(), prompts)
            info["verifier"] = {"passed": result.passed, **{k: v for k, v in result.scores.items()}}
        return values
