"""A black-box reward for the tests of the algorithms that must never ask a reward for its gradient."""

from __future__ import annotations

import torch


class RefusesBackward(torch.autograd.Function):
    """The identity, whose backward pass fails the test: a gradient was asked of the black box."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("the black-box reward was asked for a gradient")


def black_box(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The images' mean brightness, called without gradients on detached images (asserted) and refusing backward."""
    assert not torch.is_grad_enabled() and not images.requires_grad
    return RefusesBackward.apply(images.mean((1, 2, 3)))
