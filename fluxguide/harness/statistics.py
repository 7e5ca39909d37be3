"""Intervals for held-out pass rates: how far a table's numbers can be trusted.

Small pure functions on per-image outcomes (1 = the verifier passed the image, 0 = not; any float works):

- :func:`bootstrap_interval`: the percentile bootstrap interval of a mean (a pass rate);
- :func:`paired_bootstrap_interval`: the interval of the difference between two samplers evaluated on the same
  prompts and noise, resampling the images of both jointly, so what the two share (a hard prompt, a lucky noise)
  cancels;
- :func:`wilson_interval`: the Wilson score interval of a pass rate, in closed form (no resampling);
- :func:`gain_verdict`: one line saying whether a gain's interval lies above zero.

``cluster_size`` resamples consecutive blocks together: with prompt-major outcomes (every prompt's images next to
each other) and ``cluster_size = samples_per_prompt``, whole prompts are resampled, so the interval counts the
prompts, not only the images (images of one prompt are not independent). Every resampling draws from a seeded
``torch.Generator``: the same outcomes and seed give the same interval, bit for bit.
"""

from __future__ import annotations

from statistics import NormalDist

import torch

#: The confidence level of every interval in the tables.
LEVEL = 0.9
#: Bootstrap resamples (the interval's ends move by well under a point between seeds at this count).
RESAMPLES = 10_000


def _cluster_means(values: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Per-cluster means of ``values`` (float64) in blocks of ``cluster_size``."""
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"outcomes must be a non-empty 1-d sequence, got shape {tuple(values.shape)}")
    if cluster_size < 1 or len(values) % cluster_size:
        raise ValueError(f"cluster_size {cluster_size} does not divide the {len(values)} outcomes into equal blocks")
    return values.view(-1, cluster_size).mean(1)


def _percentiles(clusters: torch.Tensor, level: float, resamples: int, seed: int) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``clusters`` (equal-size clusters: the mean of means)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    generator = torch.Generator().manual_seed(seed)
    n, means = len(clusters), []
    for start in range(0, resamples, 1000):  # bounded memory: 1000 resamples of n indices at a time
        index = torch.randint(n, (min(1000, resamples - start), n), generator=generator)
        means.append(clusters[index].mean(1))
    tail = (1 - level) / 2
    lo, hi = torch.quantile(torch.cat(means), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi


def bootstrap_interval(outcomes: torch.Tensor | list[float], *, level: float = LEVEL, cluster_size: int = 1,
                       resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``outcomes`` and its percentile bootstrap ``level`` interval.

    All outcomes equal (all passed, or none) give a zero-width interval at that value.
    """
    clusters = _cluster_means(torch.as_tensor(outcomes, dtype=torch.float64).flatten(), cluster_size)
    lo, hi = _percentiles(clusters, level, resamples, seed)
    return float(clusters.mean()), lo, hi


def paired_bootstrap_interval(outcomes: torch.Tensor | list[float], reference: torch.Tensor | list[float], *,
                              level: float = LEVEL, cluster_size: int = 1, resamples: int = RESAMPLES,
                              seed: int = 0) -> tuple[float, float, float]:
    """``(gain, lo, hi)``: ``mean(outcomes) - mean(reference)`` and its paired bootstrap ``level`` interval.

    ``outcomes[i]`` and ``reference[i]`` are two samplers' results on the same image slot (same prompt and noise);
    each resample draws slots (or clusters of slots), keeping both samplers' results of a slot together.
    """
    a = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
    b = torch.as_tensor(reference, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need one result per image slot from each sampler: got {len(a)} and {len(b)}")
    clusters = _cluster_means(a - b, cluster_size)
    lo, hi = _percentiles(clusters, level, resamples, seed)
    return float(clusters.mean()), lo, hi


def wilson_interval(successes: int, total: int, *, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score ``level`` interval of a pass rate ``successes / total`` (closed form, images independent)."""
    if total < 1 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total >= 1, got {successes} of {total}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, z2 = successes / total, z * z / total
    centre = (p + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * (p * (1 - p) / total + z2 / (4 * total)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def gain_verdict(name: str, gain: float, lo: float, hi: float, *, reference: str = "base", level: float = LEVEL) -> str:
    """One line: ``"ppo: +5.0 points over base, 90% interval [+1.2, +8.9]: above base"`` (rates in [0, 1])."""
    if lo > 0:
        verdict = f"above {reference}"
    elif hi < 0:
        verdict = f"below {reference}"
    else:
        verdict = f"not distinguishable from {reference}"
    return (f"{name}: {100 * gain:+.1f} points over {reference}, {100 * level:g}% interval "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]: {verdict}")
