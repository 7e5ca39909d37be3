"""Per-token MLP guidance (the seed's ``MLPGuidanceModel``, "a good starting point").

Each token sees its own ``[img, pred]`` channels, where it sits in the image (Fourier features of its
(row, col)), the timestep and the pooled text embedding. Tokens do not see each other: the cheapest model,
linear in the number of tokens.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from fluxguide.policies.base import BaseGuidanceModel, CheckedNetwork, GuidanceInputs, as_grid, check_positive
from fluxguide.policies.embeddings import (
    AdaLayerNorm,
    ConditionEmbedding,
    embed_tokens,
    token_input_layers,
    zero_module,
)

if TYPE_CHECKING:
    from fluxguide.backbones.base import Backbone


class _ResidualLayer(nn.Module):
    """``h + silu(W adaLN(h, cond))``: one hidden layer of the MLP, conditioned by adaLN."""

    def __init__(self, dim: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.norm = AdaLayerNorm(dim, dim, device=device, dtype=dtype)
        self.linear = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(self.norm(h, cond)))


class TokenMLPTrunk(CheckedNetwork):
    """The per-token MLP that :class:`MLPGuidanceModel` and the critic share; each adds its own head.

    Tokens are embedded from their ``[img, pred]`` channels and position, run through ``num_layers - 1``
    residual layers conditioned on the timestep and pooled text, and normalised by adaLN; a subclass creates
    its head (:meth:`build_head`) and reads it (:meth:`compute`). The layers are attributes of the network
    itself (``cond``, ``in_proj``, ``pos_proj``, ``layers``, ``out_norm``), so saved state dicts keep their
    keys; the constructor arguments are its config.

    Args:
        latent_channels: channels ``C`` of packed latents (Flux: 64; the shapes world: 48).
        hidden_dim: width of the hidden layers.
        num_layers: number of hidden layers (the input projection and ``num_layers - 1`` residual layers).
        vec_dim: width of the pooled text embedding (Flux: 768, CLIP-L).
        grid_size: the token grid ``(rows, cols)``; ``None`` assumes a square grid of ``seq`` tokens.
        pos_frequencies: Fourier frequencies per axis of the position embedding.
        time_embed_dim: width of the sinusoidal timestep embedding.
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
        self,
        latent_channels: int = 64,
        hidden_dim: int = 1024,
        num_layers: int = 3,
        vec_dim: int = 768,
        grid_size: int | tuple[int, int] | None = None,
        pos_frequencies: int = 8,
        time_embed_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(type(self).__name__, latent_channels=latent_channels, hidden_dim=hidden_dim,
                       num_layers=num_layers, vec_dim=vec_dim, pos_frequencies=pos_frequencies)
        grid = as_grid(grid_size)
        self.register_config(
            latent_channels=latent_channels,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            vec_dim=vec_dim,
            grid_size=None if grid is None else list(grid),
            pos_frequencies=pos_frequencies,
            time_embed_dim=time_embed_dim,
        )
        self.latent_channels, self.vec_dim, self.grid_size = latent_channels, vec_dim, grid
        self.pos_frequencies = pos_frequencies
        kw = {"device": device, "dtype": dtype}
        self.cond = ConditionEmbedding(hidden_dim, vec_dim, time_embed_dim, **kw)
        self.in_proj, self.pos_proj = token_input_layers(latent_channels, hidden_dim, pos_frequencies, **kw)
        self.layers = nn.ModuleList(_ResidualLayer(hidden_dim, **kw) for _ in range(num_layers - 1))
        self.out_norm = AdaLayerNorm(hidden_dim, hidden_dim, **kw)
        self.build_head(hidden_dim, device, dtype)

    @abstractmethod
    def build_head(self, hidden_dim: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Create the head that reads the ``hidden_dim`` token features (after the trunk's layers)."""

    def trunk(self, img: torch.Tensor, pred: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        """The normalised token features ``(B, seq, hidden_dim)``."""
        cond = self.cond(inputs.timestep, vec)
        h = embed_tokens(self.in_proj, self.pos_proj, img, pred, inputs.grid, self.pos_frequencies)
        for layer in self.layers:
            h = layer(h, cond)
        return self.out_norm(h, cond)


class MLPGuidanceModel(TokenMLPTrunk, BaseGuidanceModel, architecture="mlp"):
    """Per-token MLP guidance conditioned on timestep, pooled text and token position: the trunk of
    :class:`TokenMLPTrunk` (whose arguments it takes) and a zero-initialised linear map to the correction."""

    def build_head(self, hidden_dim: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.out = zero_module(nn.Linear(hidden_dim, self.latent_channels, device=device, dtype=dtype))

    @classmethod
    def for_backbone(cls, backbone: Backbone, *, hidden_dim: int, num_layers: int, vec_dim: int,
                     grid_size: tuple[int, int], device: torch.device | str) -> MLPGuidanceModel:
        """``build_policy("mlp", backbone)``: sized for the backbone's latents, pooled text and token grid."""
        return cls(latent_channels=backbone.latent_channels, hidden_dim=hidden_dim, num_layers=num_layers,
                   vec_dim=vec_dim, grid_size=grid_size, device=device)

    def compute(
        self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> torch.Tensor:
        return self.out(self.trunk(img, pred, vec, inputs)).to(pred.dtype)


def create_mlp_guidance_model(
    latent_channels: int = 64,
    hidden_dim: int = 1024,
    num_layers: int = 3,
    **kwargs: object,
) -> MLPGuidanceModel:
    """The seed's factory: an :class:`MLPGuidanceModel` with Flux-dev defaults (other kwargs pass through)."""
    return MLPGuidanceModel(
        latent_channels=latent_channels, hidden_dim=hidden_dim, num_layers=num_layers, **kwargs
    )
