"""Per-token MLP guidance (the seed's ``MLPGuidanceModel``, "a good starting point").

Each token sees its own ``[img, pred]`` channels, where it sits in the image (Fourier features of its
(row, col)), the timestep and the pooled text embedding. Tokens do not see each other: the cheapest model,
linear in the number of tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from fluxguide.policies.base import BaseGuidanceModel, GuidanceInputs, as_grid
from fluxguide.policies.embeddings import (
    AdaLayerNorm,
    ConditionEmbedding,
    embed_tokens,
    token_input_layers,
    zero_module,
)


class _ResidualLayer(nn.Module):
    """``h + silu(W adaLN(h, cond))``: one hidden layer of the MLP, conditioned by adaLN."""

    def __init__(self, dim: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.norm = AdaLayerNorm(dim, dim, device=device, dtype=dtype)
        self.linear = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(self.norm(h, cond)))


class TokenMLPTrunk:
    """The per-token MLP of :class:`MLPGuidanceModel` and the critic (a mixin of ``nn.Module`` subclasses).

    Tokens are embedded from their ``[img, pred]`` channels and position, run through ``num_layers - 1``
    residual layers conditioned on the timestep and pooled text, and normalised by adaLN; each subclass adds
    its own head. The layers are the subclass's own attributes (``cond``, ``in_proj``, ``pos_proj``,
    ``layers``, ``out_norm``), so saved state dicts keep their keys.
    """

    def build_trunk(
        self,
        latent_channels: int,
        hidden_dim: int,
        num_layers: int,
        vec_dim: int,
        pos_frequencies: int,
        time_embed_dim: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Check the sizes and create the trunk's layers."""
        if min(latent_channels, hidden_dim, num_layers, vec_dim, pos_frequencies) < 1:
            raise ValueError(
                f"{type(self).__name__} sizes must be >= 1, got latent_channels={latent_channels}, "
                f"hidden_dim={hidden_dim}, num_layers={num_layers}, vec_dim={vec_dim}, "
                f"pos_frequencies={pos_frequencies}"
            )
        self.latent_channels, self.vec_dim = latent_channels, vec_dim
        self.pos_frequencies = pos_frequencies
        kw = {"device": device, "dtype": dtype}
        self.cond = ConditionEmbedding(hidden_dim, vec_dim, time_embed_dim, **kw)
        self.in_proj, self.pos_proj = token_input_layers(latent_channels, hidden_dim, pos_frequencies, **kw)
        self.layers = nn.ModuleList(_ResidualLayer(hidden_dim, **kw) for _ in range(num_layers - 1))
        self.out_norm = AdaLayerNorm(hidden_dim, hidden_dim, **kw)

    def trunk(
        self, img: torch.Tensor, pred: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised token features ``(B, seq, hidden_dim)`` and the conditioning ``(B, hidden_dim)``."""
        cond = self.cond(inputs.timestep, vec)
        h = embed_tokens(self.in_proj, self.pos_proj, img, pred, inputs.grid, self.pos_frequencies)
        for layer in self.layers:
            h = layer(h, cond)
        return self.out_norm(h, cond), cond


class MLPGuidanceModel(TokenMLPTrunk, BaseGuidanceModel):
    """Per-token MLP guidance conditioned on timestep, pooled text and token position.

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
        self.grid_size = grid
        self.build_trunk(latent_channels, hidden_dim, num_layers, vec_dim, pos_frequencies, time_embed_dim, device, dtype)
        self.out = zero_module(nn.Linear(hidden_dim, latent_channels, device=device, dtype=dtype))

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
    ) -> torch.Tensor:
        features, _ = self.trunk(img, pred, vec, self.check_inputs(img, pred, txt, vec, timestep, step_idx))
        return self.out(features).to(pred.dtype)


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
