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
from fluxguide.policies.base import as_grid, check_observation
from fluxguide.policies.embeddings import AdaLayerNorm, ConditionEmbedding, grid_position_features
from fluxguide.policies.mlp import _ResidualLayer


class GuidanceValueModel(nn.Module):
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
        if min(latent_channels, hidden_dim, num_layers, vec_dim, pos_frequencies) < 1:
            raise ValueError(
                f"GuidanceValueModel sizes must be >= 1, got latent_channels={latent_channels}, "
                f"hidden_dim={hidden_dim}, num_layers={num_layers}, vec_dim={vec_dim}"
            )
        grid = as_grid(grid_size)
        self.config: dict[str, Any] = {
            "latent_channels": latent_channels,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "vec_dim": vec_dim,
            "grid_size": None if grid is None else list(grid),
            "pos_frequencies": pos_frequencies,
        }
        self.latent_channels, self.vec_dim, self.grid_size = latent_channels, vec_dim, grid
        self.pos_frequencies = pos_frequencies
        kw = {"device": device, "dtype": dtype}
        self.cond = ConditionEmbedding(hidden_dim, vec_dim, **kw)
        self.in_proj = nn.Linear(2 * latent_channels, hidden_dim, **kw)
        self.pos_proj = nn.Linear(4 * pos_frequencies, hidden_dim, **kw)
        self.layers = nn.ModuleList(_ResidualLayer(hidden_dim, **kw) for _ in range(num_layers - 1))
        self.out_norm = AdaLayerNorm(hidden_dim, hidden_dim, **kw)
        self.head = nn.Linear(hidden_dim, 1, **kw)

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        inputs = check_observation(
            type(self).__name__,
            img,
            pred,
            txt,
            vec,
            timestep,
            step_idx,
            latent_channels=self.latent_channels,
            grid_size=self.grid_size,
            txt_dim=None,
            vec_dim=self.vec_dim,
        )
        dtype = self.in_proj.weight.dtype
        pos = grid_position_features(*inputs.grid, self.pos_frequencies, device=img.device).to(dtype)
        cond = self.cond(inputs.timestep, vec)
        h = self.in_proj(torch.cat([img, pred], dim=-1).to(dtype)) + self.pos_proj(pos)[None]
        for layer in self.layers:
            h = layer(h, cond)
        pooled = nn.functional.silu(self.out_norm(h, cond)).mean(dim=1)
        return self.head(pooled).float()


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
