"""PPO over the denoising MDP with TorchRL: collector, ``ClipPPOLoss``, trajectory replay buffer.

One update (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025):

1. a TorchRL ``Collector`` (``SyncDataCollector`` before torchrl 0.11) runs the Gaussian ``ProbabilisticActor`` on the native TorchRL env for one
   episode of ``B`` trajectories (``frames_per_batch = B * T``), giving a ``[B, T]`` tensordict;
2. advantages, either critic-free -- the reward-to-go normalised over each group of trajectories that share
   a prompt (:func:`group_advantages`; with a terminal-only reward this is DDPO's per-prompt normalisation and
   GRPO's group advantage) -- or GAE (Schulman et al. 2016) with a value network;
3. the ``B`` trajectories go into a replay buffer that samples whole trajectories without replacement;
   each of ``epochs`` passes takes minibatches of trajectories and steps TorchRL's ``ClipPPOLoss``.

The KL penalty to the base sampler is the env's ``control_cost``: the per-step Gaussian KL of the guided
step to the base step (SDE mode, exact) or the squared correction (ODE mode), subtracted from the reward
at every step, i.e. KL-regularised RL. The KL to the *initial* policy (RL from a distilled start, DDPO-style
fine-tuning near a pretrained model) is a loss term instead, ``init_kl * KL(pi_theta || pi_init)`` on each
minibatch's states (:func:`gaussian_kl`), with a frozen copy of the initial actor as ``reference``. Log-probs
are reduced over the action by mean (default) or sum
(:class:`fluxguide.policies.ReducedNormal`).

Data-parallel (``torchrun``, :mod:`fluxguide.distributed`): each rank collects its own episode (its own
prompts, so every group stays on one rank), averages the gradients over ranks after each minibatch's
backward pass, and returns metrics gathered over every rank's trajectories.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDictBase
from torch import nn

try:  # torchrl >= 0.11 names the single-process collector Collector; before, SyncDataCollector
    from torchrl.collectors import Collector
except ImportError:  # pragma: no cover - older torchrl
    from torchrl.collectors import SyncDataCollector as Collector
from torchrl.data import LazyTensorStorage, SamplerWithoutReplacement, TensorDictReplayBuffer
from torchrl.objectives import ClipPPOLoss, ValueEstimators

from fluxguide import distributed, keys
from fluxguide.algos.common import Algorithm, LossOutput, NonFiniteLossError, mean_over_ranks, optimizer_step
from fluxguide.algos.registry import AlgorithmSpec, Stage, budgets
from fluxguide.envs.torchrl_env import GuidanceTorchRLEnv

AdvantageMode = Literal["group", "gae"]

#: Keys of the loss output that are diagnostics, logged as ``train/<name>``.
LOSS_DIAGNOSTICS: tuple[str, ...] = ("clip_fraction", "kl_approx", "ESS", "max_ratio", "mean_ratio", "entropy",
                                     "explained_variance")


@dataclass
class PPOConfig:
    """Hyper-parameters of :class:`PPO` (defaults follow DDPO / Flow-GRPO scaled to the shapes world).

    Attributes:
        clip_epsilon: PPO clip range of the ratio (Flow-GRPO uses 1e-4 with summed log-probs of Flux
            latents; with mean-reduced log-probs 0.2 is the usual range).
        epochs: passes over each collected batch.
        minibatch_trajectories: whole trajectories per minibatch (each contributes its ``T`` steps).
        advantage: ``"group"`` (critic-free, per-prompt normalised) or ``"gae"`` (value network).
        gamma, lmbda: discount and GAE lambda (``gamma = 1``: the episode is a fixed-length sampler run).
        normalize_advantage: standardise GAE advantages per minibatch (group advantages already are).
        critic_coef: weight of the critic's loss (GAE).
        entropy_coef: entropy bonus (0: off; a fixed-std Gaussian's entropy is constant anyway).
        max_grad_norm: clip the global gradient norm (``None``: off).
        group_std_eps: groups whose reward std is below this carry no signal: advantage 0.
        init_kl: weight of the KL of the policy to the reference actor (the initial policy) on the minibatch's
            states, ``loss_init_kl`` (0: off; the KL is still logged when a reference is given).
    """

    clip_epsilon: float = 0.2
    epochs: int = 2
    minibatch_trajectories: int = 8
    advantage: AdvantageMode = "group"
    gamma: float = 1.0
    lmbda: float = 0.95
    normalize_advantage: bool = True
    critic_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    group_std_eps: float = 1e-6
    init_kl: float = 0.0

    def __post_init__(self) -> None:
        if self.init_kl < 0 or not math.isfinite(self.init_kl):
            raise ValueError(f"init_kl must be a finite number >= 0, got {self.init_kl}")
        if self.advantage not in ("group", "gae"):
            raise ValueError(f"advantage must be 'group' or 'gae', got {self.advantage!r}")
        if not (self.clip_epsilon > 0 and math.isfinite(self.clip_epsilon)):
            raise ValueError(f"clip_epsilon must be a positive number, got {self.clip_epsilon}")
        if self.epochs < 1 or self.minibatch_trajectories < 1:
            raise ValueError(
                f"epochs and minibatch_trajectories must be >= 1, got {self.epochs} and {self.minibatch_trajectories}"
            )


def rewards_to_go(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{s >= t} gamma^(s - t) r_s`` along the last dim of ``rewards`` ``(..., T)``."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def group_advantages(
    rewards: torch.Tensor, group_size: int, gamma: float = 1.0, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic-free advantages: the reward-to-go standardised within each group of trajectories of one prompt.

    Args:
        rewards: per-step rewards ``(B, T)``; trajectories ``g * k .. g * k + k - 1`` share a prompt.
        group_size: ``k``, the trajectories per prompt (``B`` must be a multiple).
        gamma: discount of the reward-to-go.
        eps: a group whose std (at a step) is below ``eps`` gets advantage 0 there (no signal).

    Returns:
        ``(B, T)`` advantages and statistics of the groups' returns: ``group_reward_mean`` (mean of group
        means), ``group_reward_std`` (mean within-group std) and ``zero_std_group_fraction``.
    """
    b, steps = rewards.shape
    if group_size < 1 or b % group_size:
        raise ValueError(f"{b} trajectories do not split into groups of {group_size} (samples_per_prompt)")
    g = rewards_to_go(rewards.float(), gamma).view(b // group_size, group_size, steps)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, unbiased=False, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    flat = std < eps
    adv = torch.where(flat, torch.zeros_like(g), (g - mean) / std.clamp_min(eps))
    stats = {
        "group_reward_mean": float(mean[:, 0, 0].mean()),
        "group_reward_std": float(std[:, 0, 0].mean()),
        "zero_std_group_fraction": float(flat[:, 0, 0].float().mean()),
    }
    return adv.view(b, steps), stats


def gaussian_kl(p: torch.distributions.Normal, q: torch.distributions.Normal) -> torch.Tensor:
    """``KL(p || q)`` of two element-wise Gaussians, averaged over every element (the mean reduction of the
    log-probs). Elements where either std is 0 (point masses: steps where the policy does not explore) add 0,
    as they add 0 to the log-probs."""
    sp, sq = p.scale.float(), q.scale.float()
    active = (sp > 0) & (sq > 0)
    sp_, sq_ = torch.where(active, sp, 1.0), torch.where(active, sq, 1.0)
    kl = torch.log(sq_ / sp_) + (sp_.square() + (p.loc.float() - q.loc.float()).square()) / (2 * sq_.square()) - 0.5
    return torch.where(active, kl, torch.zeros_like(kl)).mean()


class PPO(Algorithm):
    """PPO on a :class:`~fluxguide.envs.GuidanceTorchRLEnv`: collect one episode batch, then update.

    Args:
        env: the TorchRL env (``samples_per_prompt`` sets the group size of the critic-free advantage).
        actor: a Gaussian ``ProbabilisticActor`` (:func:`fluxguide.policies.make_probabilistic_actor`).
        optimizer: over the actor's (and critic's) parameters.
        config: :class:`PPOConfig`.
        critic: a ``ValueOperator`` writing ``state_value`` (needed for ``advantage="gae"``).
        reference: a frozen copy of the initial actor, for ``config.init_kl`` (and the logged ``init_kl``).

    A checkpoint saves ``modules = {"actor": actor}`` (plus ``"critic"`` with GAE) and ``optimizers =
    {"policy": optimizer}``.

    Example:
        >>> ppo = PPO(env, actor, torch.optim.Adam(actor.parameters(), 1e-4), PPOConfig())
        >>> for _ in range(10):
        ...     metrics = ppo.update()
    """

    name = "ppo"
    loss_name = "PPO loss"
    advice = "Check the reward for NaN, lower the learning rate or the policy std"

    def __init__(
        self,
        env: GuidanceTorchRLEnv,
        actor: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: PPOConfig | None = None,
        critic: nn.Module | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        self.env, self.actor, self.optimizer = env, actor, optimizer
        self.reference = None if reference is None else reference.eval().requires_grad_(False)
        self.config = cfg = config or PPOConfig()
        if cfg.advantage == "gae" and critic is None:
            raise ValueError("advantage='gae' needs a critic (fluxguide.policies.make_value_network)")
        if cfg.advantage == "group" and env.core.samples_per_prompt < 2:
            raise ValueError(
                "advantage='group' normalises returns within groups of trajectories of one prompt, but the env has "
                "samples_per_prompt=1 (every advantage would be 0): build the env with samples_per_prompt >= 2, "
                "or use advantage='gae' with a critic"
            )
        self.critic = critic if cfg.advantage == "gae" else None
        self.modules: dict[str, nn.Module] = {"actor": actor}
        if self.critic is not None:
            self.modules["critic"] = self.critic
        self.optimizers: dict[str, torch.optim.Optimizer] = {"policy": optimizer}
        distributed.broadcast_parameters(self.parameters())  # every rank starts from rank 0's weights
        self.num_trajectories = env.core.batch_size
        self.num_steps = env.core.num_steps
        if cfg.minibatch_trajectories > self.num_trajectories:
            raise ValueError(
                f"minibatch_trajectories={cfg.minibatch_trajectories} exceeds the {self.num_trajectories} "
                "trajectories collected per update (the env's batch_size)"
            )
        # functional=False: the loss calls the actor itself (no parameter copies), so DDP-wrapped modules work.
        self.ppo_loss = ClipPPOLoss(
            actor, self.critic, clip_epsilon=cfg.clip_epsilon, entropy_bonus=cfg.entropy_coef > 0,
            entropy_coeff=cfg.entropy_coef if cfg.entropy_coef > 0 else None,
            critic_coeff=cfg.critic_coef if self.critic is not None else None,
            normalize_advantage=cfg.normalize_advantage and cfg.advantage == "gae", functional=False,
        )
        self.ppo_loss.set_keys(sample_log_prob=keys.LOG_PROB, action=keys.ACTION, value=keys.STATE_VALUE)
        if self.critic is not None:
            self.ppo_loss.make_value_estimator(ValueEstimators.GAE, gamma=cfg.gamma, lmbda=cfg.lmbda)
        # One episode per batch: every trajectory of the env ends at step T together. The Gaussian actor is
        # not recurrent, so it needs no InitTracker (opting out silences torchrl 0.14's FutureWarning).
        kwargs = {}
        if "auto_register_policy_transforms" in inspect.signature(Collector.__init__).parameters:
            kwargs["auto_register_policy_transforms"] = False
        self.collector = Collector(
            env, actor, frames_per_batch=self.num_trajectories * self.num_steps, total_frames=-1, **kwargs
        )
        self._batches: Iterator[TensorDictBase] = iter(self.collector)
        self.buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(self.num_trajectories),
            sampler=SamplerWithoutReplacement(drop_last=True),
            batch_size=cfg.minibatch_trajectories,
        )

    def parameters(self) -> list[nn.Parameter]:
        """The trained parameters (actor, and critic with GAE)."""
        params = list(self.actor.parameters())
        return params + (list(self.critic.parameters()) if self.critic is not None else [])

    def restart_episode(self) -> None:
        """Reset the env through the collector, redrawing the pending episode from the env's generator.

        After restoring the generator from a checkpoint (``env.core.episode_rng_state``), this makes a
        resumed run collect exactly the episode the interrupted run would have collected next. The collector
        itself is built first, as in a fresh run, because building it samples the policy once (global RNG).
        """
        self.collector.reset()

    def collect(self) -> TensorDictBase:
        """One episode of all ``B`` trajectories: a ``[B, T]`` tensordict from the collector."""
        batch = next(self._batches)
        if tuple(batch.batch_size) != (self.num_trajectories, self.num_steps):
            raise RuntimeError(
                f"the collector returned a batch of shape {tuple(batch.batch_size)}, expected "
                f"({self.num_trajectories}, {self.num_steps}): the env's episodes must start at the batch start"
            )
        log_prob = batch.get(keys.LOG_PROB)
        if not bool(torch.isfinite(log_prob).all()):
            raise NonFiniteLossError(
                f"the behaviour policy produced {int((~torch.isfinite(log_prob)).sum())} non-finite log-probs: "
                "check the policy's std (log_std) and outputs"
            )
        return batch

    def advantages(self, batch: TensorDictBase) -> dict[str, float]:
        """Write ``advantage`` ``[B, T, 1]`` into ``batch``; return statistics of the episode's rewards."""
        cfg = self.config
        rewards = batch.get(("next", "reward")).squeeze(-1)
        stats: dict[str, float] = {}
        if cfg.advantage == "group":
            adv, stats = group_advantages(rewards, self.env.core.samples_per_prompt, cfg.gamma, cfg.group_std_eps)
            batch.set("advantage", adv.unsqueeze(-1))
            if distributed.world_size() > 1:  # the statistics of every rank's groups (a group is on one rank)
                stats = group_advantages(distributed.all_gather(rewards), self.env.core.samples_per_prompt,
                                         cfg.gamma, cfg.group_std_eps)[1]
        else:
            with torch.no_grad():
                self.ppo_loss.value_estimator(batch)
        return stats

    def update(self) -> dict[str, float]:
        """Collect one batch and run the PPO epochs on it; return the metrics of this update.

        PPO takes several optimizer steps per update (epochs of minibatches of whole trajectories), so it
        overrides the contract's single-step :meth:`~fluxguide.algos.common.Algorithm.update`; its sum of terms
        keeps TorchRL's order (objective, critic, entropy, then the KL to the reference).

        Diagnostics with the prefix ``first_`` come from the first minibatch before any gradient step
        (its ratio is 1 and its clip fraction 0 when the collected log-probs are consistent); the others
        are means over all minibatches.

        Raises:
            NonFiniteLossError: a non-finite log-prob or loss (nothing was stepped with it).
        """
        cfg = self.config
        batch = self.collect()
        terminal = distributed.all_gather(batch.get(("next", "reward"))[:, -1, 0])  # every rank's trajectories
        metrics: dict[str, float] = {"reward_mean": float(terminal.mean()), "reward_std": float(terminal.std())}
        metrics.update(self.advantages(batch))
        self.buffer.empty()
        self.buffer.extend(batch)
        sums: dict[str, float] = {}
        first: dict[str, float] = {}
        count = 0
        for _ in range(cfg.epochs):
            for _ in range(self.num_trajectories // cfg.minibatch_trajectories):
                minibatch = self.buffer.sample().reshape(-1)  # [mb, T] whole trajectories -> mb * T steps
                out = self.loss(minibatch).losses
                loss = out["loss_objective"] + sum(out[k] for k in ("loss_critic", "loss_entropy", "loss_init_kl")
                                                   if k in out)
                # An explicit all-reduce rather than DDP: the actor is also run by the collector (no grad) and
                # the trained parameters span the actor's Gaussian head and the critic; averaging the gradients
                # here, before clipping, is what DDP would do, and a no-op on one process.
                grad_norm = optimizer_step(
                    loss, self.optimizer, max_grad_norm=cfg.max_grad_norm, parameters=self.parameters(),
                    before_clip=distributed.average_gradients, name=self.loss_name,
                    terms={k: v.detach() for k, v in out.items() if k.startswith("loss_")}, advice=self.advice,
                )
                values = {k: float(v.detach()) for k, v in out.items() if v.numel() == 1}
                values["grad_norm"] = grad_norm
                values["loss"] = float(loss.detach())
                if count == 0:
                    first = {f"first_{k}": values[k] for k in ("mean_ratio", "max_ratio", "clip_fraction")}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        local = {**first, **{k: v / count for k, v in sums.items()}}
        verifier = self.env.terminal_info.get("verifier")
        if verifier is not None:
            local["verifier_pass_rate"] = float(verifier["passed"].float().mean())
        metrics.update(mean_over_ranks(local))  # equal batches per rank: the mean over all of them
        return metrics

    def loss(self, minibatch: TensorDictBase) -> LossOutput:
        """The clipped PPO terms on a minibatch of steps (TorchRL's ``ClipPPOLoss``: ``loss_objective``,
        ``loss_critic``, ``loss_entropy`` and its diagnostics), with ``loss_init_kl`` / ``init_kl`` given a
        reference."""
        out = dict(self.ppo_loss(minibatch).items())
        if self.reference is not None:
            out.update(self.init_kl_terms(minibatch))
        return LossOutput(out)

    def init_kl_terms(self, minibatch: TensorDictBase) -> dict[str, torch.Tensor]:
        """``init_kl`` (the policy's KL to the reference on these states) and, with ``config.init_kl > 0``,
        ``loss_init_kl``; the reference runs without grad."""
        assert self.reference is not None
        dist = self.actor.get_dist(minibatch.clone(False))
        with torch.no_grad():
            ref = self.reference.get_dist(minibatch.clone(False))
        kl = gaussian_kl(dist, ref)
        terms = {"init_kl": kl.detach()}
        if self.config.init_kl > 0:
            terms["loss_init_kl"] = self.config.init_kl * kl
        return terms

    def shutdown(self) -> None:
        """Release the collector (the env stays usable)."""
        self.collector.shutdown(close_env=False)


_SMOKE = ("--batch-size", "4", "--samples-per-prompt", "2", "--minibatch-trajectories", "2", "--total-updates", "2")

SPECS = (
    AlgorithmSpec("ppo", "PPO on the denoising MDP, exploring the affine schedule's coefficients",
                  (Stage("train_ppo.py", budgets=budgets(_SMOKE, 320)),), PPO, reward="black-box", main_job=True,
                  minutes=7.0),
    AlgorithmSpec("grpo", "GRPO as Flow-GRPO runs it: group advantages, SDE exploration, KL to the reference",
                  (Stage("train_ppo.py", args=("--preset", "grpo"), budgets=budgets(_SMOKE, 320)),), PPO,
                  reward="black-box"),
)
