"""The algorithm contract: the shared non-finite error, the guarded optimizer step, BC as an algorithm.

Cheap checks on tiny modules; the algorithms' own tests (and tests/distributed) run them on the shapes world.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from fluxguide import keys
from fluxguide.algos import (
    PPO,
    Algorithm,
    BCConfig,
    BCLoss,
    BehaviourCloning,
    NonFiniteLossError,
    RewardGradient,
    bc_update,
    optimizer_step,
)
from fluxguide.data.episodes import TARGET
from fluxguide.policies import MLPGuidanceModel


def test_non_finite_loss_error_is_a_floating_point_error() -> None:
    assert issubclass(NonFiniteLossError, FloatingPointError)
    with pytest.raises(FloatingPointError):  # what `except FloatingPointError` in older scripts still catches
        raise NonFiniteLossError("x")


def test_optimizer_step_refuses_non_finite_losses_and_gradients_before_stepping() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite PPO loss nan \(terms \{'loss_a': nan\}\).*unchanged"):
        loss = net(x).sum() * float("nan")
        optimizer_step(loss, opt, max_grad_norm=1.0, terms={"loss_a": loss}, name="PPO loss")
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm"):
        optimizer_step(net(x).sum(), opt, max_grad_norm=None, before_clip=lambda ps: ps[0].grad.fill_(math.inf))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # A finite step clips to max_grad_norm and reports the norm before clipping.
    norm = optimizer_step(100 * net(x).sum(), opt, max_grad_norm=1e-3)
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert norm > 1.0 and float(grads.norm()) == pytest.approx(1e-3, rel=1e-4)


def script_learning_rate(lr: float, schedule: str, warmup: int, total: int, update: int) -> float:
    """``learning_rate()`` as experiments/train_bc.py had it."""
    if update < warmup:
        return lr * (update + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (update - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize(("schedule", "warmup", "total"), [("cosine", 50, 2000), ("constant", 3, 10),
                                                           ("cosine", 0, 7), ("cosine", 10, 10)])
def test_bc_learning_rate_schedule_is_the_scripts(schedule: str, warmup: int, total: int) -> None:
    config = BCConfig(lr=3e-4, lr_schedule=schedule, warmup_updates=warmup, total_updates=total)
    for update in range(total + 3):
        assert config.learning_rate(update) == script_learning_rate(3e-4, schedule, warmup, total, update)
    with pytest.raises(ValueError, match="lr_schedule"):
        BCConfig(lr_schedule="linear")


def bc_setup() -> tuple[BCLoss, torch.optim.Optimizer, TensorDict]:
    torch.manual_seed(0)
    model = MLPGuidanceModel(latent_channels=8, hidden_dim=16, num_layers=1, vec_dim=4, grid_size=2)
    loss = BCLoss(model)
    g = torch.Generator().manual_seed(1)
    b = 6
    batch = TensorDict({
        keys.IMG: torch.randn(b, 4, 8, generator=g), keys.PRED: torch.randn(b, 4, 8, generator=g),
        keys.TXT: torch.randn(b, 3, 4, generator=g), keys.VEC: torch.randn(b, 4, generator=g),
        keys.T: torch.rand(b, generator=g), keys.STEP: torch.randint(3, (b,), generator=g),
        TARGET: torch.randn(b, 4, 8, generator=g),
    }, batch_size=[b])
    return loss, torch.optim.AdamW(loss.parameters(), lr=1.0), batch


def test_behaviour_cloning_is_the_scripts_loop_with_its_schedule() -> None:
    config = BCConfig(lr=1e-2, lr_schedule="cosine", warmup_updates=2, total_updates=5, max_grad_norm=0.5)
    loss, opt, batch = bc_setup()
    bc = BehaviourCloning(loss, opt, config)
    assert isinstance(bc, Algorithm)
    assert bc.modules == {"loss": loss} and bc.optimizers == {"policy": opt}
    ref_loss, ref_opt, _ = bc_setup()
    for step in range(5):
        metrics = bc.update(batch, step)
        lr = script_learning_rate(1e-2, "cosine", 2, 5, step)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        expected = bc_update(ref_loss, ref_opt, batch, max_grad_norm=0.5)
        assert metrics == {**expected, "loss": expected["loss_bc"], "learning_rate": lr}
    assert all(torch.equal(a, b) for a, b in zip(loss.state_dict().values(), ref_loss.state_dict().values()))
    assert bc.evaluate(batch).keys() == {"loss_bc", "mse", "target_rms", "correction_rms", "relative_error"}


def test_every_algorithm_names_its_checkpoint_parts() -> None:
    for cls in (RewardGradient, PPO, BehaviourCloning):
        assert callable(cls.update)
    loss, opt, batch = bc_setup()
    bc = BehaviourCloning(loss, opt)
    batch[TARGET] = batch[TARGET] * float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite BC loss"):
        bc.update(batch, 0)
