"""WeightedSum and CallableReward: composition, per-part logging, differentiability, output checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxguide.rewards import (
    CallableReward,
    CLIPScore,
    NotDifferentiableError,
    StyleSimilarity,
    WeightedSum,
    make_reward,
    require_differentiable,
    reward_with_grad,
)
from tests.toy_rewards import brightness


def red_fraction(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Non-differentiable: counts pixels (thresholding)."""
    return (images[:, 0] > images[:, 1:].max(dim=1).values).float().mean(dim=(1, 2))


class Contrast(nn.Module):
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.std(dim=(1, 2, 3))


def test_weighted_sum_equals_sum_of_parts_and_logs_each(tiny_clip, images, prompts) -> None:
    model, tokenizer = tiny_clip
    clip = CLIPScore(model, tokenizer)
    style = StyleSimilarity(model, images[:2])
    bright = CallableReward(brightness)
    total = WeightedSum({"clip": (clip, 1.0), "style": (style, -0.5), "brightness": (bright, 3.0)})
    assert total.differentiable
    with torch.no_grad():
        value = total(images, prompts)
        parts = {
            "clip": clip(images, prompts),
            "style": style(images, prompts),
            "brightness": brightness(images, []),
        }
    expected = parts["clip"] - 0.5 * parts["style"] + 3.0 * parts["brightness"]
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert set(total.last_components) == {"clip", "style", "brightness"}
    for name, values in parts.items():
        torch.testing.assert_close(total.last_components[name], values, rtol=0, atol=1e-6)
    assert total.weights == {"clip": 1.0, "style": -0.5, "brightness": 3.0}

    x = images.clone().requires_grad_(True)
    reward_with_grad(total, x, prompts).sum().backward()
    assert x.grad.abs().sum() > 0
    assert not total.last_components["clip"].requires_grad  # logged values are detached


def test_non_differentiable_part_makes_the_sum_non_differentiable(images, prompts) -> None:
    red = CallableReward(red_fraction, differentiable=False)
    total = WeightedSum({"bright": CallableReward(brightness), "red": (red, 2.0)})
    assert not total.differentiable
    with pytest.raises(
        NotDifferentiableError,
        match=r"WeightedSum is not differentiable .*\(its parts \['red'\] are not\).*use PPO",
    ):
        reward_with_grad(total, images, prompts)
    with pytest.raises(NotDifferentiableError, match="PPO"):
        require_differentiable(red)
    # Values are still available (for PPO), with nested components named "outer/inner".
    outer = WeightedSum({"inner": total, "contrast": CallableReward(Contrast())})
    with torch.no_grad():
        value = outer(images, prompts)
    torch.testing.assert_close(
        value, brightness(images, []) + 2 * red_fraction(images, []) + images.std((1, 2, 3))
    )
    assert set(outer.last_components) == {"inner", "inner/bright", "inner/red", "contrast"}


def test_sum_from_registry_names(images, prompts) -> None:
    total = make_reward(
        "sum", parts={"b": ("callable", 2.0, {"fn": brightness}), "c": CallableReward(Contrast())}
    )
    assert isinstance(total, WeightedSum)
    torch.testing.assert_close(total(images, prompts), 2 * brightness(images, []) + images.std((1, 2, 3)))


def test_bad_parts() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        WeightedSum({})
    with pytest.raises(TypeError, match="weight of part 'b' must be a number"):
        WeightedSum({"b": (CallableReward(brightness), "heavy")})
    with pytest.raises(TypeError, match="part 'b' must be a reward module or a \\(reward, weight\\) tuple"):
        WeightedSum({"b": brightness})
    with pytest.raises(ValueError, match="without '/'"):
        WeightedSum({"a/b": CallableReward(brightness)})


def test_callable_output_is_validated(images, prompts) -> None:
    with pytest.raises(
        ValueError, match=r"reward function 'column' must return .* shape \(4,\), got shape \(4, 1\)"
    ):
        CallableReward(lambda x, p: x.mean(dim=(1, 2, 3))[:, None], name="column")(images, prompts)
    with pytest.raises(TypeError, match="reward function 'as_list' must return a torch.Tensor"):
        CallableReward(lambda x, p: [0.0] * len(p), name="as_list")(images, prompts)
    with pytest.raises(TypeError, match="fn must be callable"):
        CallableReward(3.0)
    module_reward = CallableReward(Contrast())
    assert "fn" in dict(module_reward.named_children())  # an nn.Module fn moves with .to()
