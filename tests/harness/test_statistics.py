"""The intervals of the comparison tables: known answers, determinism, pairing and clustering."""

from __future__ import annotations

import pytest
import torch

from fluxguide.harness.statistics import (
    bootstrap_interval,
    gain_verdict,
    paired_bootstrap_interval,
    wilson_interval,
)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_equal_outcomes_give_a_zero_width_interval(value: float) -> None:
    assert bootstrap_interval([value] * 30, resamples=500) == (value, value, value)


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    outcomes = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0] * 10)
    first = bootstrap_interval(outcomes, resamples=2000, seed=3)
    assert bootstrap_interval(outcomes, resamples=2000, seed=3) == first  # same inputs, same interval
    mean, lo, hi = first
    assert mean == 0.625 and lo < mean < hi
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0))  # any float outcomes: another seed moves it
    assert bootstrap_interval(scores, resamples=500, seed=4) != bootstrap_interval(scores, resamples=500, seed=3)


def test_bootstrap_agrees_with_the_normal_approximation_on_a_large_sample() -> None:
    """400 outcomes at 50%: both the bootstrap and Wilson give about +-1.645 * 2.5 points."""
    outcomes = torch.tensor([1.0, 0.0] * 200)
    _, lo, hi = bootstrap_interval(outcomes, resamples=4000)
    wilson = wilson_interval(200, 400)
    assert lo == pytest.approx(wilson[0], abs=0.006) and hi == pytest.approx(wilson[1], abs=0.006)
    assert hi - lo == pytest.approx(2 * 1.645 * 0.025, abs=0.01)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)  # statsmodels proportion_confint(5, 10, alpha=0.1, method="wilson")
    assert (lo, hi) == (pytest.approx(0.269272, abs=1e-6), pytest.approx(0.730728, abs=1e-6))
    z2 = 1.6448536269514722**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))  # no success: upper end z^2 / (n + z^2)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_paired_difference_of_a_constant_shift_is_that_shift_exactly() -> None:
    reference = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0] * 5)
    assert paired_bootstrap_interval(reference + 0.25, reference, resamples=500) == (0.25, 0.25, 0.25)


def test_pairing_removes_what_two_samplers_share() -> None:
    """A policy that fixes 8 of 60 images and breaks none is clearly above base when paired; unpaired, the two
    pass rates' intervals overlap."""
    base = torch.tensor([1.0, 0.0, 0.0] * 20)
    policy = base.clone()
    policy[torch.nonzero(base == 0).flatten()[:8]] = 1.0
    gain, lo, hi = paired_bootstrap_interval(policy, base, resamples=2000)
    assert gain == pytest.approx(8 / 60) and 0 < lo < gain < hi
    assert bootstrap_interval(policy, resamples=2000)[1] < bootstrap_interval(base, resamples=2000)[2]
    with pytest.raises(ValueError, match="one result per image slot"):
        paired_bootstrap_interval(policy, base[:-1])


def test_clusters_are_resampled_whole() -> None:
    """Prompts whose images all agree: resampling whole prompts of 4 gives the interval of 10 prompts, wider
    than that of 40 independent images; a cluster size that does not divide the outcomes is refused."""
    outcomes = torch.tensor([1.0, 0.0]).repeat_interleave(4).repeat(5)  # 10 prompts x 4 identical images
    _, lo_images, hi_images = bootstrap_interval(outcomes, resamples=2000)
    mean, lo, hi = bootstrap_interval(outcomes, cluster_size=4, resamples=2000)
    assert mean == 0.5 and hi - lo > hi_images - lo_images
    with pytest.raises(ValueError, match="cluster_size 3"):
        bootstrap_interval(outcomes, cluster_size=3)


def test_gain_verdict_lines() -> None:
    assert gain_verdict("ppo", 0.05, 0.012, 0.089) == "ppo: +5.0 points over base, 90% interval [+1.2, +8.9]: above base"
    assert gain_verdict("bc", 0.0, -0.03, 0.03).endswith("not distinguishable from base")
    assert gain_verdict("rg", -0.1, -0.2, -0.01).endswith("below base")
