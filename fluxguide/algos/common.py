"""The algorithm contract and what every algorithm shares: the non-finite error, the guarded optimizer step, metrics.

Every algorithm (:class:`~fluxguide.algos.RewardGradient`, :class:`~fluxguide.algos.PPO`,
:class:`~fluxguide.algos.BehaviourCloning`) has the shape of :class:`Algorithm`, so a training loop (the run
harness) drives any of them the same way::

    metrics = algo.update(...)        # one update; metrics already averaged over data-parallel ranks
    save_checkpoint(run_dir, step, modules=algo.modules, optimizers=algo.optimizers, ...)

- :meth:`Algorithm.update` returns un-prefixed float metrics (``loss``, ``grad_norm``, ``reward_mean``, ...),
  the same on every rank (:func:`mean_over_ranks`), and raises :class:`NonFiniteLossError` on a NaN/inf loss
  or gradient *before* the optimizer step, so the weights are never poisoned.
- :attr:`Algorithm.modules` and :attr:`Algorithm.optimizers` name what a checkpoint holds (the plain
  modules, never their data-parallel wrappers); the names are those the training scripts have always saved
  under, so old checkpoints keep loading.
- :func:`optimizer_step` is the one backward / gradient averaging / clipping / non-finite check / step
  sequence all of them use.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fluxguide import distributed
from fluxguide.distributed import mean_over_ranks

__all__ = [
    "Algorithm",
    "LossOutput",
    "NonFiniteLossError",
    "clip_and_check_gradients",
    "data_parallel_once",
    "mean_over_ranks",
    "optimizer_parameters",
    "optimizer_step",
    "total_loss",
    "unwrap_data_parallel",
]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/inf; the update was not applied (a :class:`FloatingPointError`)."""


@dataclass
class LossOutput:
    """What an algorithm's :meth:`Algorithm.loss` returns for one optimizer step.

    Attributes:
        losses: named terms; those whose names start with ``loss_`` are summed into the optimised loss (TorchRL's
            loss modules name their terms the same way), the others are logged as they are.
        metrics: float diagnostics of the step (``reward_mean``, ...), logged next to the terms.
        count: the samples this process contributed, the weight of its metrics in the mean over ranks.
        pooled_std: ``{"reward_std": "reward_mean"}``: stds pooled exactly over ranks with their means.
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    count: int | None = None
    pooled_std: dict[str, str] = field(default_factory=dict)


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the terms whose names start with ``loss_`` (TorchRL's convention)."""
    terms = [v for k, v in losses.items() if k.startswith("loss_")]
    if not terms:
        raise ValueError(f"no loss terms (names starting with 'loss_') in {sorted(losses)}")
    return torch.stack([t.float() for t in terms]).sum()


class Algorithm(ABC):
    """The contract of a training algorithm: what it declares and the one update path it shares.

    An algorithm declares its registry :attr:`name`, its ``config`` (a dataclass), the :attr:`modules` and
    :attr:`optimizers` a checkpoint holds (by the names old checkpoints used), and writes two methods:

    - :meth:`collect` -- the data step: what one update consumes (fresh trajectories on the guided sampler, a
      batch of a dataset, an env rollout), built from the update's inputs;
    - :meth:`loss` -- the named loss terms on that data (:class:`LossOutput`).

    :meth:`update` is the shared bookkeeping: ``collect``, ``loss``, the sum of the ``loss_*`` terms, backward,
    gradient averaging and clipping, the non-finite check (nothing is stepped with a NaN/inf), the optimizer
    step and the mean of the metrics over data-parallel ranks. An algorithm that takes several optimizer steps
    per update (PPO's epochs of minibatches) overrides :meth:`update` and calls :meth:`optimize` for each.

    The smallest complete algorithm (docs/design.md shows it with its script)::

        class OneStepReward(Algorithm):
            name = "one-step-reward"

            def __init__(self, backbone, policy, reward, optimizer, config):
                self.backbone, self.policy, self.reward, self.config = backbone, policy, reward, config
                self.modules, self.optimizers = {"policy": policy}, {"policy": optimizer}

            def collect(self, prompts, generator):
                return self.backbone.encode(prompts), self.backbone.noise(len(prompts), generator)

            def loss(self, data):
                cond, noise = data
                images = self.backbone.decode(denoise(self.backbone, noise, ..., guidance_model=self.policy))
                rewards = call_reward(self.reward, images, cond.prompts)
                return LossOutput({"loss_reward": -rewards.mean()}, {"reward_mean": float(rewards.mean())})
    """

    #: The registry name (:data:`fluxguide.algos.registry.ALGORITHMS`), also the label of its runs.
    name: ClassVar[str] = ""
    #: How the optimised loss is called in a non-finite error, and what the error suggests.
    loss_name: ClassVar[str] = "loss"
    advice: ClassVar[str] = "Lower the learning rate"
    #: What its runs' ``charts/samples_seen`` counts: ``"image"`` (sampled images or trajectories) or ``"pair"``
    #: (dataset pairs: behaviour cloning, whose cost in images is its collection's).
    sample_unit: ClassVar[str] = "image"

    config: Any
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def collect(self, *inputs: Any, **options: Any) -> Any:
        """The data one update consumes, from the update's inputs (default: the single input itself)."""
        if options or len(inputs) != 1:
            raise TypeError(f"{type(self).__name__}.collect takes one input by default; override it")
        return inputs[0]

    @abstractmethod
    def loss(self, data: Any) -> LossOutput:
        """The named loss terms (and metrics) of one optimizer step on ``data``."""

    def update(self, *inputs: Any, **options: Any) -> dict[str, float]:
        """One update: :meth:`collect`, :meth:`loss`, :meth:`optimize`; float metrics averaged over ranks.

        Raises:
            NonFiniteLossError: the loss or a gradient is NaN/inf; nothing was stepped with it.
        """
        return self.optimize(self.loss(self.collect(*inputs, **options)))

    def optimize(self, out: LossOutput, *, optimizer: torch.optim.Optimizer | None = None,
                 parameters: Iterable[nn.Parameter] | None = None,
                 before_clip: Callable[[list[nn.Parameter]], None] | None = None) -> dict[str, float]:
        """Step the optimizer on the ``loss_*`` terms of ``out``; returns ``loss``, every term, the metrics and
        ``grad_norm``, averaged over ranks (weighted by ``out.count``)."""
        loss = total_loss(out.losses)
        terms = {k: float(v.detach()) for k, v in out.losses.items()}
        grad_norm = optimizer_step(
            loss, optimizer or self.optimizers["policy"],
            max_grad_norm=getattr(getattr(self, "config", None), "max_grad_norm", None),  # None: no clipping
            parameters=parameters, before_clip=before_clip, name=self.loss_name,
            terms={k: v for k, v in terms.items() if k.startswith("loss_")}, advice=self.advice)
        metrics = {"loss": float(loss.detach()), **terms, **out.metrics, "grad_norm": grad_norm}
        return mean_over_ranks(metrics, pooled_std=out.pooled_std or None, count=out.count)


def unwrap_data_parallel(module: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel`` wrapper (``module`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def data_parallel_once(module: nn.Module) -> nn.Module:
    """:func:`fluxguide.distributed.data_parallel` of ``module``, unless it is already wrapped."""
    return module if unwrap_data_parallel(module) is not module else distributed.data_parallel(module)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter ``optimizer`` steps, in order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def clip_and_check_gradients(parameters: Iterable[nn.Parameter], max_grad_norm: float | None,
                             advice: str = "Lower the learning rate or set max_grad_norm") -> float:
    """Clip the global gradient norm (if ``max_grad_norm``) and return the norm before clipping.

    Without ``max_grad_norm`` the gradients are left as they are (the norm is only measured).

    Raises:
        NonFiniteLossError: the gradient holds NaN/inf (the caller must not step the optimizer).
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    norm_value = float(norm)
    if not math.isfinite(norm_value):
        raise NonFiniteLossError(
            f"non-finite gradient norm {norm_value}: NaN/inf gradients; the update was skipped. {advice}"
        )
    return norm_value


def _detach(value: torch.Tensor | float) -> torch.Tensor | float:
    return value.detach() if isinstance(value, torch.Tensor) else value


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None,
    parameters: Iterable[nn.Parameter] | None = None,
    before_clip: Callable[[list[nn.Parameter]], None] | None = None,
    terms: Mapping[str, torch.Tensor | float] | None = None,
    name: str = "loss",
    advice: str = "Lower the learning rate",
) -> float:
    """Backpropagate ``loss`` and step ``optimizer``, refusing a non-finite loss or gradient; returns the grad norm.

    The sequence: check the loss, ``zero_grad``, ``backward``, ``before_clip(parameters)`` (e.g.
    :func:`fluxguide.distributed.average_gradients` where the module is not DDP-wrapped), clip the global norm
    to ``max_grad_norm`` (``None``: no clipping), check it, ``step``.

    Args:
        loss: the scalar to minimise.
        optimizer: steps ``parameters``.
        max_grad_norm: clip the global gradient norm to this (``None``: measure only).
        parameters: whose gradients are clipped and checked (default: the optimizer's).
        before_clip: called on ``parameters`` between the backward pass and the clipping.
        terms: named loss terms, shown in the error message.
        name: what the loss is called in the error message (e.g. ``"PPO loss"``).
        advice: what the error message suggests.

    Raises:
        NonFiniteLossError: the loss or the gradient is NaN/inf; the optimizer was not stepped.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        shown = "" if terms is None else f" (terms {({k: float(_detach(v)) for k, v in terms.items()})})"
        raise NonFiniteLossError(
            f"non-finite {name} {value}{shown}; the update was skipped and the policy is unchanged. {advice}"
        )
    params = optimizer_parameters(optimizer) if parameters is None else list(parameters)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_clip is not None:
        before_clip(params)
    grad_norm = clip_and_check_gradients(params, max_grad_norm, advice)
    optimizer.step()
    return grad_norm
