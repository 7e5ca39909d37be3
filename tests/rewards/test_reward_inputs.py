"""Bad input to any reward raises an error naming the bad value and the fix."""

from __future__ import annotations

import pytest
import torch

from fluxguide.rewards import CallableReward, CLIPScore
from tests.toy_rewards import brightness


@pytest.fixture(params=["clip", "callable"])
def reward(request, tiny_clip):
    if request.param == "clip":
        return CLIPScore(*tiny_clip)
    return CallableReward(brightness)


GOOD = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a red circle", "a blue bar"]


@pytest.mark.parametrize(
    ("images", "prompts", "error", "pattern"),
    [
        (
            GOOD * 2 - 1,
            PROMPTS,
            ValueError,
            r"must be in \[0, 1\], got values in \[-0.99.*\(images \+ 1\) / 2",
        ),
        (GOOD * 255, PROMPTS, ValueError, r"must be in \[0, 1\], got values in \[.*, 25\d.*images / 255"),
        (GOOD * 1.1, PROMPTS, ValueError, r"must be in \[0, 1\], got values in \[.*, 1.(09|1)\].*clamp"),
        (GOOD[:, :1], PROMPTS, ValueError, r"3 \(RGB\) channels in dim 1, got 1 with shape \(2, 1, 32, 32\)"),
        (torch.rand(2, 4, 32, 32), PROMPTS, ValueError, r"got 4 with shape \(2, 4, 32, 32\).*alpha"),
        (GOOD.permute(0, 2, 3, 1), PROMPTS, ValueError, r"got 32 .*permute\(0, 3, 1, 2\)"),
        (GOOD[0], PROMPTS, ValueError, r"4 dimensions \(B, 3, H, W\), got 3 .*unsqueeze\(0\)"),
        (
            (GOOD * 255).to(torch.uint8),
            PROMPTS,
            TypeError,
            r"floating-point.*torch.uint8.*images.float\(\) / 255",
        ),
        (GOOD.numpy(), PROMPTS, TypeError, r"must be a torch.Tensor .* got ndarray"),
        (torch.full((2, 3, 32, 32), float("nan")), PROMPTS, ValueError, r"non-finite"),
        (GOOD, PROMPTS[:1], ValueError, r"got 1 prompts for 2 images; pass exactly one prompt per image"),
        (GOOD, PROMPTS * 2, ValueError, r"got 4 prompts for 2 images"),
        (
            GOOD,
            "a red circle",
            TypeError,
            r"got a single string 'a red circle'; pass \['a red circle'\] \* 2",
        ),
        (
            GOOD,
            ["a red circle", 3],
            TypeError,
            r"prompts must be strings; items \(index, type\) \[\(1, 'int'\)\]",
        ),
    ],
)
def test_bad_input_is_a_clear_error(reward, images, prompts, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        reward(images, prompts)


def test_small_overshoot_is_tolerated(reward) -> None:
    # bf16 rounding of clamped decoder output may exceed 1 by a few 1e-3.
    images = GOOD.clone()
    images[0, 0, 0, 0] = 1.004
    images[1, 0, 0, 0] = -0.004
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and torch.isfinite(out).all()
