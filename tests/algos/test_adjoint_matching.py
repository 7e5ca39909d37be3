"""Adjoint Matching on a case with a known answer: a Gaussian base flow tilted by a linear reward.

The base: data ``x0 ~ N(mu, diag(s^2))`` in 2-D, noise ``N(0, I)``, ``x_t = (1 - t) x0 + t noise``. The exact
rectified-flow velocity is linear in ``x``: ``v(x, t) = E[noise - x0 | x_t = x] = -mu + k(t) (x - (1 - t) mu)`` with
``k(t) = Cov(v, x_t) / Var(x_t) = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2)``. The reward ``r(x) = c . x`` with scale
``lambda`` tilts the data to ``N(mu + lambda s^2 c, diag(s^2))``: the mean moves, the variance does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fluxguide.algos import AdjointMatching, AdjointMatchingConfig, NonFiniteLossError, sample_memoryless
from fluxguide.rewards import NonFiniteRewardError
from fluxguide.sampling import denoise
from fluxguide.sampling.memoryless import memoryless_coefficients, memoryless_sigma
from tests.gaussian_flow import MEAN, STD, C, Control, GaussianFlow, Shift, Started, linear_reward

LAMBDA = 1.0
NUM_STEPS = 100  # the memoryless sampler's variance bias on this base is about 2.5% at 100 steps (7% at 40)


def zero_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return 0.0 * images.sum((1, 2, 3))


def train(reward, updates: int, seed: int = 0, start: nn.Module | None = None,
          ) -> tuple[GaussianFlow, nn.Module, list[dict[str, float]]]:
    """Adjoint Matching from zero, or from ``start`` relative to it (the frozen start is the reference)."""
    torch.manual_seed(seed)
    backbone = GaussianFlow(MEAN, STD)
    policy = Control() if start is None else Started(start)
    reference = None if start is None else copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), 1e-2)
    algo = AdjointMatching(backbone, policy, reward, optimizer, AdjointMatchingConfig(
        num_steps=NUM_STEPS, reward_scale=LAMBDA, time_subsample=25, max_grad_norm=None), reference=reference)
    assert algo.modules == {"policy": policy} and algo.optimizers == {"policy": optimizer}
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, updates)
    generator, history = torch.Generator().manual_seed(seed), []
    for _ in range(updates):
        history.append(algo.update(["x"] * 64, generator))
        schedule.step()
    return backbone, policy, history


def samples(backbone: GaussianFlow, policy: nn.Module | None, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of the memoryless SDE and of the deterministic Euler sampler (the harness's), same noise."""
    cond, ts = backbone.encode(["x"] * n), backbone.schedule(NUM_STEPS)
    noise = backbone.noise(n, torch.Generator().manual_seed(123))
    sde = sample_memoryless(backbone, policy, cond, noise, ts, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ode = denoise(backbone, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, ts, guidance_model=policy)
    return sde.states[-1].reshape(n, 2), ode.reshape(n, 2)


def test_trained_control_moves_the_samples_to_the_tilted_gaussian() -> None:
    backbone, policy, history = train(linear_reward, updates=400)
    target_mean = MEAN + LAMBDA * STD**2 * C  # (0.86, -1.22); the std stays (0.6, 1.2)
    # The optimal control cost, KL(tilted || base) = lambda^2 c^T Sigma c / 2 = 0.36.
    assert history[-1]["control_cost"] == pytest.approx(0.5 * LAMBDA**2 * float(C @ (STD**2 * C)), rel=0.15)
    assert history[-1]["reward_mean"] > history[0]["reward_mean"] + 0.3
    # Tolerances: mean within 0.05 per coordinate on the memoryless SDE (measured 0.029, 0.036), 0.06 on the
    # Euler sampler the harness evaluates with (measured 0.009, 0.045); std within 6% (the discretisation's bias
    # is ~2.5%; measured 3.0%, 2.2% and 0.7%, 0.7%).
    for name, x, tol in zip(("memoryless SDE", "Euler ODE"), samples(backbone, policy), (0.05, 0.06), strict=True):
        assert (x.mean(0) - target_mean).abs().max() < tol, (name, x.mean(0), target_mean)
        assert ((x.std(0) / STD) - 1).abs().max() < 0.06, (name, x.std(0), STD)


def test_zero_reward_leaves_the_base_sampler_unchanged() -> None:
    backbone, policy, history = train(zero_reward, updates=5)
    assert all(m["control_cost"] == 0 and m["loss"] == 0 and m["grad_norm"] == 0 for m in history)
    assert all(float(p.detach().abs().max()) == 0 for p in policy.net[-1].parameters())  # the control is still exactly 0
    guided, base = samples(backbone, policy, 4000), samples(backbone, None, 4000)
    for x, y in zip(guided, base, strict=True):
        assert torch.equal(x, y)
    sde = base[0]  # and the base sampler is the base distribution (up to the discretisation's variance bias)
    assert (sde.mean(0) - MEAN).abs().max() < 0.05 and ((sde.std(0) / STD) - 1).abs().max() < 0.06


def test_memoryless_step_limits() -> None:
    a, b, std = memoryless_coefficients(1.0, 0.75)  # from pure noise: a fresh draw (1 - s) x0_hat + s xi
    assert (a, b, std) == pytest.approx((0.25, -0.25, 0.75))
    assert memoryless_coefficients(0.25, 0.0) == pytest.approx((1.0, -0.25, 0.0))  # to data: x0_hat = x - t v
    t, dt = 0.4, 1e-5  # small steps: the SDE x + dt (-2 v - x / (1 - t)) + sigma(t) sqrt(dt) xi
    a, b, std = memoryless_coefficients(t, t - dt)
    assert (a - 1) / dt == pytest.approx(-1 / (1 - t), rel=1e-3) and b / dt == pytest.approx(-2, rel=1e-3)
    assert std**2 / dt == pytest.approx(memoryless_sigma(t) ** 2, rel=1e-3)


def test_non_finite_reward_gradient_is_refused_and_settings_are_checked() -> None:
    torch.manual_seed(0)
    backbone, policy = GaussianFlow(MEAN, STD), Control()
    before = [p.detach().clone() for p in policy.parameters()]
    # Finite rewards whose gradient is NaN (sqrt at 0): the adjoint, the targets and the loss are NaN.
    algo = AdjointMatching(backbone, policy, lambda im, p: (im.sum((1, 2, 3)) * 0).sqrt(),
                           torch.optim.Adam(policy.parameters(), 1e-2), AdjointMatchingConfig(num_steps=4))
    with pytest.raises(NonFiniteLossError, match="adjoint matching loss"):
        algo.update(["x"] * 4, torch.Generator().manual_seed(0))
    # A NaN reward itself is refused where it enters, naming the reward (issue 27).
    algo.reward = lambda im, p: im.sum((1, 2, 3)) * float("nan")
    with pytest.raises(NonFiniteRewardError, match="<lambda> returned 4 NaN values"):
        algo.update(["x"] * 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), before, strict=True))
    for bad in ({"time_subsample": 0}, {"reward_scale": -1.0}, {"weighting": "sum"}, {"guidance_scale": 0.0}):
        with pytest.raises(ValueError):
            AdjointMatchingConfig(num_steps=4, **bad)


SHIFT = torch.tensor([-0.4, 0.3])


def test_from_a_start_the_target_is_the_tilt_of_the_start() -> None:
    """Relative to a reference (the frozen start), the fixed point is p_start exp(lambda r): here the start samples
    N(MEAN + SHIFT, STD^2), so the target is N(MEAN + SHIFT + lambda STD^2 C, STD^2), and a zero reward keeps it."""
    backbone, policy, history = train(zero_reward, updates=3, start=Shift(SHIFT))
    assert all(m["control_cost"] == 0 and m["loss"] == 0 for m in history)  # no KL to the start, nothing to learn
    sde, _ = samples(backbone, policy, 4000)
    assert (sde.mean(0) - (MEAN + SHIFT)).abs().max() < 0.06  # the start's distribution, not the base's

    backbone, policy, history = train(linear_reward, updates=250, start=Shift(SHIFT))
    target_mean = MEAN + SHIFT + LAMBDA * STD**2 * C
    assert history[-1]["control_cost"] == pytest.approx(0.5 * LAMBDA**2 * float(C @ (STD**2 * C)), rel=0.2)
    for name, x in zip(("memoryless SDE", "Euler ODE"), samples(backbone, policy), strict=True):
        assert (x.mean(0) - target_mean).abs().max() < 0.07, (name, x.mean(0), target_mean)
        assert ((x.std(0) / STD) - 1).abs().max() < 0.08, (name, x.std(0), STD)
