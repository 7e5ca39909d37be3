"""Mean brightness: a reward anything can raise without drawing what the prompt says.

Not a reward to train for: a probe. Optimised, it whitens the images, and the rewards the policy is not trained on
(and the shapes world's verifier) fall; that is the signature the reward-hacking diagnostics look for
(:mod:`fluxguide.harness.monitoring`), and the test of those diagnostics trains on it.
"""

from __future__ import annotations

import torch

from fluxguide.rewards.base import RewardModel


class MeanBrightness(RewardModel):
    """The mean pixel value of each image, in [0, 1] (differentiable)."""

    def describe(self) -> str:
        return "the mean pixel value (a hackable probe reward)"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))
