"""The marginal-preserving SDE step (Flow-GRPO), its std and its Gaussian log-probability."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fluxguide.sampling import euler_step, gaussian_log_prob, get_schedule, sde_mean, sde_step, sde_step_std

TIMES = get_schedule(10, 256)


def flow_grpo_std_and_mean(
    x: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int, a: float
) -> tuple[float, torch.Tensor]:
    """Flow-GRPO's ``sde_step_with_logprob`` (Liu et al. 2025, Eq. 9), written out for step ``i``:
    ``std_dev_t = a * sqrt(sigma / (1 - sigma))`` with ``sigmas[1]`` standing in for ``sigma = 1`` in the
    denominator; the step's std is ``std_dev_t * sqrt(-dt)``."""
    sigma, sigma_prev = sigmas[i], sigmas[i + 1]
    dt = sigma_prev - sigma
    denom = sigmas[1] if sigma == 1.0 else sigma
    std_dev_t = math.sqrt(sigma / (1 - denom)) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return std_dev_t * math.sqrt(-dt), mean


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_std_and_mean_follow_flow_grpo(noise_level: float) -> None:
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 8, 4, generator=g, dtype=torch.float64), torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    for i in range(len(TIMES) - 1):
        want_std, want_mean = flow_grpo_std_and_mean(x, v, TIMES, i, noise_level)
        assert sde_step_std(TIMES[i], TIMES[i + 1], noise_level) == pytest.approx(want_std, rel=1e-12)
        out = sde_step(x, v, TIMES[i], TIMES[i + 1], noise_level, generator=g)
        assert float(out.std) == pytest.approx(want_std, rel=1e-12)
        torch.testing.assert_close(out.mean, want_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sde_mean(x, v, TIMES[i], TIMES[i + 1], noise_level), want_mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_is_normal_log_prob(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 16, 8, generator=g, dtype=dtype), torch.randn(3, 16, 8, generator=g, dtype=dtype)
    for i in (0, 4, len(TIMES) - 2):
        out = sde_step(x, v, TIMES[i], TIMES[i + 1], 0.7, generator=g)
        assert out.log_prob.shape == x.shape and out.log_prob.dtype == dtype
        want = torch.distributions.Normal(out.mean, out.std).log_prob(out.sample)
        torch.testing.assert_close(out.log_prob, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gaussian_log_prob(out.sample, out.mean, out.std), want, rtol=1e-6, atol=1e-6)
        assert not torch.equal(out.sample, out.mean), "the SDE step must add noise"


def test_log_prob_in_float32_for_bf16() -> None:
    x = torch.randn(2, 4, 4).bfloat16()
    out = sde_step(x, x, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.log_prob.dtype == torch.float32 and out.std.dtype == torch.float32


def test_given_noise_and_generator_reproduce() -> None:
    x, v = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    noise = torch.randn(2, 4, 4)
    out = sde_step(x, v, 0.8, 0.6, 0.7, noise=noise)
    torch.testing.assert_close(out.sample, out.mean + out.std * noise)
    a = sde_step(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(3)).sample
    b = sde_step(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(3)).sample
    assert torch.equal(a, b)


def test_noise_level_zero_is_euler() -> None:
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    for t_curr, t_prev in itertools.pairwise(TIMES):
        out = sde_step(x, v, t_curr, t_prev, noise_level=0.0, generator=g)
        assert torch.equal(out.sample, euler_step(x, v, t_curr, t_prev))
        assert torch.equal(out.mean, out.sample)
        assert float(out.std) == 0.0 and torch.equal(out.log_prob, torch.zeros_like(x))


def test_given_sample_is_evaluated_not_drawn() -> None:
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    old = sde_step(x, v, 0.9, 0.8, 0.7, generator=g).sample
    state = g.get_state()
    v_new = v + 0.1  # the policy changed: same action, new log-prob (PPO's ratio)
    out = sde_step(x, v_new, 0.9, 0.8, 0.7, generator=g, sample=old)
    assert torch.equal(g.get_state(), state), "evaluating a given sample must not draw noise"
    assert out.sample is old
    want = torch.distributions.Normal(sde_mean(x, v_new, 0.9, 0.8, 0.7), out.std).log_prob(old)
    torch.testing.assert_close(out.log_prob, want)


def test_log_prob_gradient_is_the_score_of_the_mean() -> None:
    # Policy gradient: the drawn sample is the action, a constant; d log p / d mean = (sample - mean) / std^2.
    x = torch.randn(2, 8, 4)
    v = torch.randn(2, 8, 4, requires_grad=True)
    out = sde_step(x, v, 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(5))
    (grad_v,) = torch.autograd.grad(out.log_prob.sum(), v)
    dmean_dv = (1 + (0.7**2 * 0.7 / 0.3) * 0.3 / (2 * 0.7)) * (0.6 - 0.7)
    want = (out.sample - out.mean).detach() / out.std**2 * dmean_dv
    torch.testing.assert_close(grad_v, want, rtol=1e-4, atol=1e-5)
    assert out.sample.requires_grad, "the sample itself stays reparameterised (reward gradients)"


@pytest.mark.parametrize(("t_curr", "t_prev", "noise_level", "match"), [
    (0.5, 0.5, 0.7, "needs t_prev < t_curr, got t_curr=0.5, t_prev=0.5"),
    (0.4, 0.6, 0.7, "needs t_prev < t_curr"),
    (0.6, 0.4, -0.1, "noise_level must be >= 0, got -0.1"),
])
def test_bad_step_raises(t_curr: float, t_prev: float, noise_level: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sde_step(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), t_curr, t_prev, noise_level)


def gaussian_velocity(x: torch.Tensor, t: float, m: float, s: float) -> torch.Tensor:
    """Exact ``E[noise - x0 | x_t = x]`` for ``x0 ~ N(m, s^2)``, ``x_t = (1 - t) x0 + t noise``."""
    var_t = (1 - t) ** 2 * s**2 + t**2
    return -m + (t - (1 - t) * s**2) / var_t * (x - (1 - t) * m)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_sde_preserves_the_marginals(noise_level: float) -> None:
    # With the exact velocity of a Gaussian data distribution, the ODE and the SDE must both end at the data
    # distribution N(m, s^2) (Flow-GRPO's SDE has the flow's marginals) up to discretisation error.
    m, s = 1.5, 0.5
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    times = get_schedule(200, 256, shift=False)
    for t_curr, t_prev in itertools.pairwise(times):
        x = sde_step(x, gaussian_velocity(x, t_curr, m, s), t_curr, t_prev, noise_level, generator=g).sample
    assert float(x.mean()) == pytest.approx(m, abs=0.01)
    assert float(x.std()) == pytest.approx(s, abs=0.01)
