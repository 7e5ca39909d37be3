"""The shapes world's grammar, split, renderer and verifier (no trained weights needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxguide.worlds.shapes import heldout_prompts, parse_prompt, train_prompts, verify
from fluxguide.worlds.shapes.scenes import (
    HELDOUT_COMBOS,
    all_prompts,
    render,
    render_prompts,
    sample_scenes,
)


def test_split_is_disjoint_and_holds_out_combinations() -> None:
    train, held = set(train_prompts()), set(heldout_prompts())
    assert not train & held
    assert train | held == set(all_prompts())
    assert len(train) == 210 and len(held) == 90
    for p in train:
        assert all((o.color, o.kind) not in HELDOUT_COMBOS for o in parse_prompt(p).objects)
    for p in held:
        assert any((o.color, o.kind) in HELDOUT_COMBOS for o in parse_prompt(p).objects)


def test_parse_roundtrip_and_errors() -> None:
    for p in all_prompts():
        assert parse_prompt(p).caption == p
    with pytest.raises(ValueError, match="purple"):
        parse_prompt("a purple circle")
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        parse_prompt("a red circle below a blue bar")


def test_rendering_is_deterministic_from_seed() -> None:
    a, _ = render_prompts(["a red circle above a blue bar"] * 4, seed=3)
    b, _ = render_prompts(["a red circle above a blue bar"] * 4, seed=3)
    c, _ = render_prompts(["a red circle above a blue bar"] * 4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 3, 32, 32) and 0 <= a.min() and a.max() <= 1


@pytest.fixture(scope="module")
def renders() -> tuple[torch.Tensor, list[str]]:
    scenes = sample_scenes(1200, np.random.default_rng(123))
    return render(scenes), [s.caption for s in scenes]


def test_verifier_accepts_true_captions(renders) -> None:
    images, captions = renders
    result = verify(images, captions)
    assert result.accuracy >= 0.99, f"verifier passed only {result.accuracy:.4f} of renders with true captions"
    assert set(result.scores) == {"count", "color", "kind", "position"}
    assert all(v.shape == (len(captions),) for v in result.scores.values())


def test_verifier_rejects_wrong_captions(renders) -> None:
    images, captions = renders
    rng = np.random.default_rng(0)
    everything = all_prompts()
    wrong = []
    for c in captions:
        w = everything[rng.integers(len(everything))]
        while w == c:
            w = everything[rng.integers(len(everything))]
        wrong.append(w)
    assert verify(images, wrong).accuracy <= 0.01


@pytest.mark.parametrize(
    ("truth", "lie", "attribute"),
    [
        ("a red circle", "a blue circle", "color"),
        ("a red circle", "a red bar", "kind"),
        ("a red circle", "a red circle on the left of a red circle", "count"),
        ("a red circle on the left of a blue bar", "a blue bar on the left of a red circle", "position"),
        ("a red circle above a blue bar", "a red circle on the left of a blue bar", "position"),
    ],
)
def test_verifier_names_the_failing_attribute(truth: str, lie: str, attribute: str) -> None:
    images, _ = render_prompts([truth] * 8, seed=0)
    result = verify(images, [lie] * 8)
    assert not result.passed.any()
    assert (result.scores[attribute] < 1).all()


def test_verifier_on_noise_and_blank_images() -> None:
    blank = torch.zeros(2, 3, 32, 32)
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = verify(torch.cat([blank, noise]), ["a red circle"] * 4)
    assert not result.passed.any()


def test_verifier_bad_input() -> None:
    with pytest.raises(ValueError, match="one prompt per image"):
        verify(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        verify(torch.zeros(2, 32, 32), ["a red circle"] * 2)
