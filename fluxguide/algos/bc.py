"""Behaviour cloning: regress a guidance model's correction onto collected target corrections.

The loss is TorchRL-style (docs/design.md, "Style"): :class:`BCLoss` returns a TensorDict of named terms, the
``loss_*`` terms are what the caller sums and backpropagates, the rest are detached diagnostics.

- ``"mse"``: ``mean((model(obs) - target)^2)``.
- ``"gaussian_nll"``: ``-log N(target; model(obs), sigma^2)`` per element (averaged), with ``sigma`` one
  learned scalar, or the policy's own std when the model is a :class:`~fluxguide.policies.GaussianHead`
  (the PPO policy), so BC can warm-start a stochastic policy with a calibrated std.

:class:`BehaviourCloning` is the algorithm (the contract of :mod:`fluxguide.algos.common`): one update sets the
learning rate of its schedule (:class:`BCConfig`), steps the loss (data-parallel under ``torchrun``) and returns
the metrics averaged over ranks. :func:`bc_update` / :func:`bc_evaluate` are the single-process steps beneath.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.algos.common import (
    Algorithm,
    LossOutput,
    data_parallel_once,
    optimizer_step,
    unwrap_data_parallel,
)
from fluxguide.algos.registry import EVAL, SMOKE, AlgorithmSpec, Stage, full_budget
from fluxguide.data.episodes import TARGET
from fluxguide.data.store import DatasetError, GuidanceDataset
from fluxguide.policies import GaussianHead, ObservationAdapter

LOSS_TYPES: tuple[str, ...] = ("mse", "gaussian_nll")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _model_sizes(model: nn.Module) -> dict[str, Any]:
    inner = model.net.model if isinstance(model, GaussianHead) else model
    return {
        "latent_channels": getattr(inner, "latent_channels", None),
        "grid_size": getattr(inner, "grid_size", None),
        "txt_dim": getattr(inner, "txt_dim", None),
        "vec_dim": getattr(inner, "vec_dim", None),
    }


def check_dataset_matches_policy(dataset: GuidanceDataset | dict[str, Any], model: nn.Module) -> None:
    """Raise :class:`DatasetError` naming expected and actual shapes if the dataset does not fit ``model``.

    Args:
        dataset: a :class:`GuidanceDataset` or its ``spec``.
        model: a guidance model (or a :class:`GaussianHead` around one).
    """
    spec = dataset.spec if isinstance(dataset, GuidanceDataset) else dataset
    where = f"the dataset at {dataset.path}" if isinstance(dataset, GuidanceDataset) else "the dataset"
    if spec is None:
        raise DatasetError(f"{where} is empty: collect some episodes before training")
    name = type(model.net.model if isinstance(model, GaussianHead) else model).__name__
    trans, eps = spec["transitions"], spec["episodes"]
    img, target = trans[keys.IMG]["shape"], trans[TARGET]["shape"]
    if len(img) != 2 or target != img or trans[keys.PRED]["shape"] != img:
        raise DatasetError(
            f"{where} holds img {img}, pred {trans[keys.PRED]['shape']} and targets {target} per step; all three "
            "must be packed latents (seq, C) of one shape"
        )
    seq, channels = img
    sizes = _model_sizes(model)
    problems = []
    if sizes["latent_channels"] is not None and sizes["latent_channels"] != channels:
        problems.append(f"latent channels: {name} expects latent_channels={sizes['latent_channels']}, "
                        f"the dataset holds latents (seq={seq}, C={channels})")
    grid = sizes["grid_size"]
    if grid is not None and grid[0] * grid[1] != seq:
        problems.append(f"token grid: {name} expects grid_size={tuple(grid)} ({grid[0] * grid[1]} tokens), "
                        f"the dataset holds seq={seq} tokens")
    txt_shape, vec_shape = eps[keys.TXT]["shape"], eps[keys.VEC]["shape"]
    if sizes["txt_dim"] is not None and txt_shape[-1] != sizes["txt_dim"]:
        problems.append(f"text features: {name} expects txt_dim={sizes['txt_dim']}, the dataset holds txt {txt_shape}")
    if sizes["vec_dim"] is not None and vec_shape[-1] != sizes["vec_dim"]:
        problems.append(f"pooled text: {name} expects vec_dim={sizes['vec_dim']}, the dataset holds vec {vec_shape}")
    if problems:
        raise DatasetError(
            f"{where} does not match the policy: " + "; ".join(problems)
            + ". Build the policy with the dataset's sizes, or collect with the backbone the policy is for"
        )


class BCLoss(nn.Module):
    """The behaviour-cloning loss of a guidance model on batches of ``(observation, target)`` pairs.

    Args:
        model: a guidance model ``f(img, pred, txt, vec, t, step) -> correction``, or a
            :class:`~fluxguide.policies.GaussianHead` (its std is used by ``"gaussian_nll"``).
        loss_type: ``"mse"`` or ``"gaussian_nll"``.
        init_std: initial std of the learned scalar ``sigma`` (``"gaussian_nll"`` with a plain model).
        target_key: the batch entry holding the target correction.
    """

    def __init__(self, model: nn.Module, loss_type: Literal["mse", "gaussian_nll"] = "mse", init_std: float = 1.0,
                 target_key: str = TARGET) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown BC loss {loss_type!r}; valid: {list(LOSS_TYPES)}")
        if not (init_std > 0 and math.isfinite(init_std)):
            raise ValueError(f"init_std must be positive and finite, got {init_std}")
        self.loss_type = loss_type
        self.target_key = target_key
        # One registered copy of the model (``net``), so its state dict holds each parameter once.
        self.is_gaussian_head = isinstance(model, GaussianHead)
        self.net = model if self.is_gaussian_head else ObservationAdapter(model)
        own_std = loss_type == "gaussian_nll" and not self.is_gaussian_head
        self.log_std = nn.Parameter(torch.tensor(math.log(init_std))) if own_std else None

    @property
    def model(self) -> nn.Module:
        """The policy being trained (the guidance model, or the Gaussian head around one)."""
        return self.net if self.is_gaussian_head else self.net.model

    def correction(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's correction (mean) on ``batch`` and, for a Gaussian head, its std."""
        obs = [batch[k] for k in keys.OBSERVATION_KEYS]
        if self.is_gaussian_head:
            loc, scale = self.net(*obs)
            return loc, scale
        return self.net(*obs), None

    def forward(self, batch: TensorDict) -> TensorDict:
        """Named terms: ``loss_bc`` (minimise it) and detached diagnostics ``mse``, ``target_rms``,
        ``correction_rms``, ``relative_error`` (``||f - y|| / ||y||``) and ``std`` for the Gaussian loss."""
        if self.target_key not in batch:
            raise KeyError(f"the batch has no {self.target_key!r} entry (keys: {sorted(batch.keys())})")
        target = batch[self.target_key].float()
        mean, scale = self.correction(batch)
        if mean.shape != target.shape:
            raise DatasetError(
                f"the policy's correction has shape {tuple(mean.shape)} but the targets {tuple(target.shape)}: "
                "the dataset does not match the policy (check_dataset_matches_policy names the difference)"
            )
        err = mean.float() - target
        mse = err.pow(2).mean()
        out = {
            "mse": mse.detach(),
            "target_rms": target.pow(2).mean().sqrt().detach(),
            "correction_rms": mean.detach().float().pow(2).mean().sqrt(),
            "relative_error": (err.detach().norm() / target.norm().clamp_min(1e-12)),
        }
        if self.loss_type == "mse":
            out["loss_bc"] = mse
        else:
            if scale is None:
                scale = self.log_std.exp()
                log_scale = self.log_std
            else:
                scale = scale.float()
                log_scale = scale.log()
            nll = 0.5 * (err / scale).pow(2) + log_scale + _LOG_SQRT_2PI
            out["loss_bc"] = nll.mean()
            out["std"] = scale.detach().float().mean()
        return TensorDict(out, batch_size=[])


def bc_update(loss_module: BCLoss | nn.Module, optimizer: torch.optim.Optimizer, batch: TensorDict,
              max_grad_norm: float | None = None) -> dict[str, float]:
    """One gradient step on the summed ``loss_*`` terms; returns every term as a float plus ``grad_norm``.

    ``loss_module`` is a :class:`BCLoss` or its data-parallel wrapper. The metrics are this process's.

    Raises:
        NonFiniteLossError: the loss or the gradient is NaN/inf; the optimizer was not stepped.
    """
    loss_module.train()
    terms = loss_module(batch)
    loss = sum(v for k, v in terms.items() if k.startswith("loss_"))
    params = [p for p in loss_module.parameters() if p.requires_grad]
    grad_norm = optimizer_step(loss, optimizer, max_grad_norm=max_grad_norm, parameters=params, name="BC loss",
                               terms={k: v for k, v in terms.items() if k.startswith("loss_")},
                               advice="Lower the learning rate or clip gradients (max_grad_norm)")
    metrics = {k: float(v.detach()) for k, v in terms.items()}
    metrics["grad_norm"] = grad_norm
    return metrics


@torch.no_grad()
def bc_evaluate(loss_module: BCLoss, batch: TensorDict) -> dict[str, float]:
    """The loss terms on ``batch`` without a gradient step (held-out BC error)."""
    loss_module.eval()
    return {k: float(v) for k, v in loss_module(batch).items()}


@dataclass
class BCConfig:
    """The optimisation settings of :class:`BehaviourCloning`.

    Attributes:
        lr: the peak learning rate.
        lr_schedule: after a linear warm-up, ``"constant"`` or ``"cosine"`` decay to 0 at ``total_updates``.
        warmup_updates: updates of the linear warm-up (0: none).
        total_updates: the length of the schedule (the run's updates).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
    """

    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_updates: int = 50
    total_updates: int = 2000
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.warmup_updates < 0 or self.total_updates < 1:
            raise ValueError(
                f"warmup_updates must be >= 0 and total_updates >= 1, got {self.warmup_updates} and {self.total_updates}"
            )

    def learning_rate(self, update: int) -> float:
        """The learning rate of update ``update`` (0-based): linear warm-up, then constant or cosine decay."""
        if update < self.warmup_updates:
            return self.lr * (update + 1) / self.warmup_updates
        if self.lr_schedule == "constant":
            return self.lr
        progress = (update - self.warmup_updates) / max(1, self.total_updates - self.warmup_updates)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BehaviourCloning(Algorithm):
    """Behaviour cloning as an algorithm: scheduled learning rate, data-parallel step, rank-averaged metrics.

    Args:
        loss_module: the :class:`BCLoss` (trained through :func:`fluxguide.distributed.data_parallel`).
        optimizer: over the loss module's parameters.
        config: :class:`BCConfig` (learning-rate schedule and gradient clipping).

    A checkpoint saves ``modules = {"loss": loss_module}`` and ``optimizers = {"policy": optimizer}``.

    Example::

        loss = BCLoss(policy)
        bc = BehaviourCloning(loss, torch.optim.AdamW(loss.parameters()), BCConfig(total_updates=100))
        for step in range(100):
            metrics = bc.update(replay.sample(), step)
    """

    name = "bc"
    sample_unit = "pair"
    loss_name = "BC loss"
    advice = "Lower the learning rate or clip gradients (max_grad_norm)"

    def __init__(self, loss_module: BCLoss, optimizer: torch.optim.Optimizer, config: BCConfig | None = None) -> None:
        self.loss_module = loss_module
        self.optimizer = optimizer
        self.config = config or BCConfig()
        self.trained = data_parallel_once(loss_module)  # DDP under torchrun: one forward, one backward per update
        self.modules: dict[str, nn.Module] = {"loss": unwrap_data_parallel(loss_module)}
        self.optimizers: dict[str, torch.optim.Optimizer] = {"policy": optimizer}

    def collect(self, batch: TensorDict, step: int) -> TensorDict:
        """Set the learning rate of the ``step``-th update (0-based) of the schedule; the data is ``batch``."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate(step)
        return batch

    def loss(self, batch: TensorDict) -> LossOutput:
        """The BC terms on this rank's ``batch``: ``loss_bc`` and its diagnostics."""
        self.trained.train()
        terms = self.trained(batch)
        return LossOutput({k: v for k, v in terms.items() if k.startswith("loss_")},
                          {k: float(v.detach()) for k, v in terms.items() if not k.startswith("loss_")})

    def update(self, batch: TensorDict, step: int) -> dict[str, float]:
        """One update (the ``step``-th, 0-based, of the schedule) on this rank's ``batch``.

        Returns:
            ``loss``, the loss terms, diagnostics and ``grad_norm`` averaged over ranks, and ``learning_rate``.

        Raises:
            NonFiniteLossError: the loss or the gradient is NaN/inf; the optimizer was not stepped.
        """
        out = self.loss(self.collect(batch, step))  # collect set the step's learning rate
        metrics = self.optimize(out, parameters=[p for p in self.trained.parameters() if p.requires_grad])
        return {**metrics, "learning_rate": self.optimizer.param_groups[0]["lr"]}

    def evaluate(self, batch: TensorDict) -> dict[str, float]:
        """The loss terms on ``batch`` without a step (:func:`bc_evaluate`; this process's batch)."""
        return bc_evaluate(self.modules["loss"], batch)


#: The main job's distillation, its ``quick`` budget: CFG 3's corrections on 128 training-prompt trajectories (each
#: also labelled under a swapped prompt) and 400 updates, evaluated once at the end without the base / CFG
#: references. It is the first two stages of the distil-then-fine-tune chain (``fluxguide.algos.distilled``), which
#: the main job runs once for both: a start for the fine-tuning, not BC's best (``collect_data.py`` and
#: ``train_bc.py`` alone: 512 trajectories, 1,500 updates; docs/results.md).
QUICK_COLLECT: tuple[str, ...] = ("--episodes", "128")
QUICK_DISTIL: tuple[str, ...] = ("--total-updates", "400", "--eval-every", "400", "--checkpoint-every", "400",
                                 "--no-eval-at-start", "--no-references", *EVAL)

SPECS = (AlgorithmSpec(
    "bc", "behaviour cloning of CFG 3's corrections (collect, then distil)",
    (Stage("collect_data.py", folder="data", folder_flag="--out-dir",
           budgets={"smoke": ("--episodes", "4", "--batch-size", "2", "--num-steps", "3"), "quick": QUICK_COLLECT,
                    "full": ("--episodes", "4096")}),
     Stage("train_bc.py", folder="train", inputs={"--dataset": "data"},
           budgets={"smoke": ("--batch-size", "16", "--total-updates", "2", *SMOKE), "quick": QUICK_DISTIL,
                    "full": full_budget(4000)})),
    BehaviourCloning, reward="black-box", main_job=True, minutes=2.5),)
