"""A Gaussian base flow with a known answer, shared by the tests of the algorithms that tilt it.

Data ``x0 ~ N(mean, diag(std^2))`` in 2-D (one token of two channels), noise ``N(0, I)``, ``x_t = (1 - t) x0 + t
noise``. The exact rectified-flow velocity is linear in ``x``: ``v(x, t) = -mean + k(t) (x - (1 - t) mean)`` with
``k(t) = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2)``. Shifting the data mean by ``d`` changes it by the correction
``-d t / ((1 - t)^2 s^2 + t^2)``, whatever ``x`` (:class:`Shift`).
"""

from __future__ import annotations

import torch
from torch import nn

from fluxguide.backbones.base import Backbone, Conditioning

MEAN, STD = torch.tensor([0.5, -0.5]), torch.tensor([0.6, 1.2])
#: The direction of :func:`linear_reward`.
C = torch.tensor([1.0, -0.5])


def linear_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``r(x) = C . x`` on the two channels the flow's decoder puts in the first two pixels' colours."""
    return images[:, :2, 0, 0] @ C


class GaussianFlow(Backbone):
    """A Backbone whose velocity is the exact rectified-flow velocity of Gaussian data (one 2-channel token)."""

    latent_seq, latent_channels, image_height, image_width = 1, 2, 1, 1
    schedule_shift = False

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def encode(self, prompts: list[str]) -> Conditioning:
        b = len(prompts)
        return Conditioning(torch.zeros(b, 1, 4), torch.zeros(b, 4), torch.zeros(1, 3), torch.zeros(1, 3), list(prompts))

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> torch.Tensor:
        t, var = timesteps.reshape(-1, 1, 1).to(img.dtype), self.std**2
        k = (t - (1 - t) * var) / ((1 - t) ** 2 * var + t**2)
        return -self.mean + k * (img - (1 - t) * self.mean)

    def decode(self, img: torch.Tensor) -> torch.Tensor:  # the two channels as pixels (values not in [0, 1])
        return torch.cat([img.reshape(-1, 2), torch.zeros(img.shape[0], 1)], 1).reshape(-1, 3, 1, 1)


class Control(nn.Module):
    """A guidance network on ``(x, t)`` with the policies' signature; zero at initialisation."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, img, pred, txt, vec, t, step) -> torch.Tensor:
        return self.net(torch.cat([img.reshape(-1, 2), t.reshape(-1, 1).to(img.dtype)], 1)).reshape(img.shape)


class Shift(nn.Module):
    """The exact correction that turns the base flow of ``N(MEAN, STD^2)`` into that of ``N(MEAN + d, STD^2)``: a
    fixed 'distilled' policy, the start of RL from a distilled start."""

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__()
        self.base, self.shifted = GaussianFlow(MEAN, STD), GaussianFlow(MEAN + d, STD)

    def forward(self, img, pred, txt, vec, t, step) -> torch.Tensor:
        return self.shifted(img, None, None, None, t, None) - self.base(img, None, None, None, t, None)


class Started(nn.Module):
    """A policy that starts at a distilled one: ``start + control`` (the control zero at the start)."""

    def __init__(self, start: nn.Module) -> None:
        super().__init__()
        self.start, self.control = start, Control()

    def forward(self, *obs) -> torch.Tensor:
        return self.start(*obs) + self.control(*obs)
