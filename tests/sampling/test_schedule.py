"""``get_schedule`` against Black Forest Labs' formula, written out independently here."""

from __future__ import annotations

import itertools
import math

import pytest

from fluxguide.sampling import get_schedule


def reference_schedule(
    num_steps: int, image_seq_len: int, base_shift: float, max_shift: float, shift: bool
) -> list[float]:
    """BFL ``flux.sampling.get_schedule`` in float64: linspace(1, 0, n + 1), then, with the shift,
    ``t -> e^mu / (e^mu + (1/t - 1))`` where ``mu`` is the line through (256, base_shift) and (4096, max_shift)."""
    ts = [1.0 - i / num_steps for i in range(num_steps + 1)]
    if not shift:
        return ts
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)
    out = []
    for t in ts:
        if t == 0.0:
            out.append(0.0)  # the limit 1/t -> inf
        else:
            out.append(math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)))
    return out


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 20, 28, 50])
@pytest.mark.parametrize("image_seq_len", [1, 16, 64, 256, 1024, 4096, 8192])
def test_matches_bfl_formula(num_steps: int, image_seq_len: int, shift: bool) -> None:
    got = get_schedule(num_steps, image_seq_len, shift=shift)
    want = reference_schedule(num_steps, image_seq_len, 0.5, 1.15, shift)
    assert isinstance(got, list) and len(got) == num_steps + 1
    assert all(isinstance(t, float) for t in got)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-6
    assert got[0] == 1.0 and got[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(got)), "the schedule must decrease strictly"


@pytest.mark.parametrize(("base_shift", "max_shift"), [(0.0, 0.0), (0.3, 2.0), (1.0, 0.5)])
@pytest.mark.parametrize("image_seq_len", [64, 256, 4096])
def test_custom_shifts(base_shift: float, max_shift: float, image_seq_len: int) -> None:
    got = get_schedule(10, image_seq_len, base_shift=base_shift, max_shift=max_shift)
    want = reference_schedule(10, image_seq_len, base_shift, max_shift, True)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-6


def test_shift_spends_more_steps_at_high_noise() -> None:
    # Esser et al. 2024 §5.3.2: more tokens -> larger mu -> every intermediate time is pushed towards 1.
    small, large = get_schedule(8, 256), get_schedule(8, 4096)
    plain = get_schedule(8, 4096, shift=False)
    assert all(p < s < big for p, s, big in zip(plain[1:-1], small[1:-1], large[1:-1]))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4"])
def test_bad_num_steps_raise(bad: object) -> None:
    with pytest.raises(ValueError, match=f"num_steps must be an integer >= 1, got {bad!r}"):
        get_schedule(bad, 256)  # type: ignore[arg-type]


def test_bad_seq_len_raises() -> None:
    with pytest.raises(ValueError, match="image_seq_len must be >= 1, got 0"):
        get_schedule(4, 0)
