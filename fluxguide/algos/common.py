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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fluxguide import distributed
from fluxguide.distributed import mean_over_ranks

__all__ = [
    "Algorithm",
    "NonFiniteLossError",
    "PolicyOnSampler",
    "clip_and_check_gradients",
    "data_parallel_once",
    "mean_over_ranks",
    "optimizer_parameters",
    "optimizer_step",
    "unwrap_data_parallel",
]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/inf; the update was not applied (a :class:`FloatingPointError`)."""


@runtime_checkable
class Algorithm(Protocol):
    """What a training loop needs of an algorithm.

    Attributes:
        modules: the modules a checkpoint saves, by name (e.g. ``{"policy": policy}``).
        optimizers: the optimizers a checkpoint saves, by name (e.g. ``{"policy": optimizer}``).
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def update(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """One update; returns float metrics averaged over ranks.

        Raises:
            NonFiniteLossError: the loss or a gradient is NaN/inf; nothing was stepped with it.
        """
        ...


def unwrap_data_parallel(module: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel`` wrapper (``module`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def data_parallel_once(module: nn.Module) -> nn.Module:
    """:func:`fluxguide.distributed.data_parallel` of ``module``, unless it is already wrapped."""
    return module if unwrap_data_parallel(module) is not module else distributed.data_parallel(module)


class PolicyOnSampler:
    """What an algorithm that trains a guidance policy on the guided sampler against a reward holds (reward gradient,
    Adjoint Matching): the backbone (and the CFG-wrapped model it samples with), the policy (data-parallel under
    torchrun), the reward, the decoder, the schedule, and the checkpoint's ``modules`` / ``optimizers``."""

    def _hold(self, backbone: Any, policy: nn.Module, reward: Any, optimizer: torch.optim.Optimizer, *,
              num_steps: int | None, cfg_scale: float, decode: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.backbone = backbone
        self.policy = data_parallel_once(policy)
        self.reward = reward
        self.optimizer = optimizer
        self.modules: dict[str, nn.Module] = {"policy": unwrap_data_parallel(policy)}
        self.optimizers: dict[str, torch.optim.Optimizer] = {"policy": optimizer}
        self.cfg_scale = cfg_scale
        self.decode = decode if decode is not None else backbone.decode
        self.model = backbone if cfg_scale == 1.0 else backbone.with_cfg(cfg_scale)
        self.timesteps = backbone.schedule(num_steps)


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
