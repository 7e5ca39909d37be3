"""A small critic for PPO with GAE: a per-token MLP pooled over the latent tokens to one value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict.utils import NestedKey
from torch import nn
from torchrl.modules import ValueOperator

from fluxguide import keys
from fluxguide.policies.actors import ObservationAdapter
from fluxguide.policies.base import GuidanceInputChecks, as_grid
from fluxguide.policies.mlp import TokenMLPTrunk


class GuidanceValueModel(TokenMLPTrunk, GuidanceInputChecks, nn.Module):
    """State value of a sampler state ``(img, pred, txt, vec, t, step) -> (B, 1)``.

    Tokens are embedded like :class:`~fluxguide.policies.MLPGuidanceModel` (channels, position, timestep,
    pooled text), mean-pooled over the sequence, and read out by a linear head.

    Args:
        latent_channels: channels ``C`` of packed latents.
        hidden_dim: width of the token MLP.
        num_layers: hidden layers of the token MLP.
        vec_dim: width of the pooled text embedding.
        grid_size: the token grid ``(rows, cols)``; ``None`` assumes a square grid.
        pos_frequencies: Fourier frequencies per axis of the position embedding.
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
        self,
        latent_channels: int = 64,
        hidden_dim: int = 256,
        num_layers: int = 2,
        vec_dim: int = 768,
        grid_size: int | tuple[int, int] | None = None,
        pos_frequencies: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        grid = as_grid(grid_size)
        self.config: dict[str, Any] = {
            "latent_channels": latent_channels,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "vec_dim": vec_dim,
            "grid_size": None if grid is None else list(grid),
            "pos_frequencies": pos_frequencies,
        }
        self.grid_size = grid
        self.build_trunk(latent_channels, hidden_dim, num_layers, vec_dim, pos_frequencies, 256, device, dtype)
        self.head = nn.Linear(hidden_dim, 1, device=device, dtype=dtype)

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        inputs = self.check_inputs(img, pred, txt, vec, timestep, step_idx)
        features, _ = self.trunk(img, pred, vec, inputs)
        return self.head(nn.functional.silu(features).mean(dim=1)).float()


def make_value_network(
    latent_channels: int = 64,
    hidden_dim: int = 256,
    num_layers: int = 2,
    vec_dim: int = 768,
    grid_size: int | tuple[int, int] | None = None,
    *,
    model: nn.Module | None = None,
    observation_keys: Sequence[NestedKey] = keys.OBSERVATION_KEYS,
    value_key: NestedKey = keys.STATE_VALUE,
    device: torch.device | str | None = None,
) -> ValueOperator:
    """A TorchRL ``ValueOperator`` reading the observation keys and writing ``"state_value"`` ``(*batch, 1)``.

    Args:
        latent_channels, hidden_dim, num_layers, vec_dim, grid_size: sizes of a new critic.
        model: use this critic (same call signature, output ``(B, 1)``) instead of building one.
        observation_keys: the six observation keys, in the order ``img, pred, txt, vec, t, step``.
        value_key: where to write the value.
        device: where to create the parameters.
    """
    if model is None:
        model = GuidanceValueModel(latent_channels, hidden_dim, num_layers, vec_dim, grid_size, device=device)
    return ValueOperator(ObservationAdapter(model), in_keys=list(observation_keys), out_keys=[value_key])
