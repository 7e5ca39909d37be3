"""The reward registry: every built-in name builds offline and honours the contract."""

from __future__ import annotations

import pytest
import torch

from fluxguide.rewards import (
    AestheticPredictor,
    CallableReward,
    NotDifferentiableError,
    available_rewards,
    make_reward,
    register_reward,
    reward_with_grad,
)
from tests.toy_rewards import brightness

BUILTIN = {
    "clip",
    "style",
    "aesthetic",
    "shapes-clip",
    "shapes-aesthetic",
    "verifier",
    "weighted-sum",
    "sum",
    "callable",
}
SHAPES_WORLD = {"shapes-clip", "shapes-aesthetic", "verifier"}


def _offline_kwargs(name: str, tiny_clip, images: torch.Tensor) -> dict:
    """How to build each built-in reward without a download."""
    model, tokenizer = tiny_clip
    if name in SHAPES_WORLD:
        pytest.importorskip("fluxguide.worlds.shapes", reason="the shapes world has not landed yet")
        return {}
    return {
        "clip": {"model": model, "tokenizer": tokenizer, "scale": 100.0},
        "style": {"model": model, "references": images[:2]},
        "aesthetic": {"clip_model": model, "predictor": AestheticPredictor(16, (8, 4), (0.1,))},
        "weighted-sum": {"parts": {"clip": ("clip", 1.0, {"model": model, "tokenizer": tokenizer})}},
        "sum": {
            "parts": {
                "b": ("callable", 0.5, {"fn": brightness}),
                "s": ("style", 1.0, {"model": model, "references": images}),
            }
        },
        "callable": {"fn": brightness},
    }[name]


def test_builtin_names_are_registered() -> None:
    assert BUILTIN <= set(available_rewards())


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_returns_finite_batch_values_and_gradients_if_differentiable(
    name: str, tiny_clip, images, prompts
) -> None:
    reward = make_reward(name, **_offline_kwargs(name, tiny_clip, images))
    with torch.no_grad():
        out = reward(images, prompts)
    assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    x = images.clone().requires_grad_(True)
    if reward.differentiable:
        reward_with_grad(reward, x, prompts).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    else:
        with pytest.raises(NotDifferentiableError, match="not differentiable.*PPO"):
            reward_with_grad(reward, x, prompts)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'clipp'; valid names: aesthetic, brightness, callable, clip, "):
        make_reward("clipp")


def test_names_are_case_and_underscore_insensitive(images, prompts) -> None:
    reward = make_reward("Weighted_Sum", parts={"b": ("CALLABLE", 1.0, {"fn": brightness})})
    torch.testing.assert_close(reward(images, prompts), brightness(images, prompts))


def test_missing_arguments_say_what_is_needed(tiny_clip) -> None:
    model, _ = tiny_clip
    with pytest.raises(ValueError, match="also needs tokenizer="):
        make_reward("clip", model=model)
    with pytest.raises(ValueError, match="needs references="):
        make_reward("style", model=model)
    with pytest.raises(ValueError, match="needs predictor_path="):
        make_reward("aesthetic")
    with pytest.raises(ValueError, match="needs parts="):
        make_reward("sum")


def test_register_a_custom_reward(images, prompts) -> None:
    @register_reward("test-darkness")
    def make_darkness(weight: float = 1.0) -> CallableReward:
        return CallableReward(lambda x, p: -weight * x.mean(dim=(1, 2, 3)), name="darkness")

    assert "test-darkness" in available_rewards()
    torch.testing.assert_close(
        make_reward("test-darkness", weight=2.0)(images, prompts), -2 * brightness(images, [])
    )
    with pytest.raises(ValueError, match="'test-darkness' is already registered"):
        register_reward("test-darkness")(make_darkness)
    register_reward("test-darkness", overwrite=True)(make_darkness)
