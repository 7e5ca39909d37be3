"""Conditioning shared by the guidance networks: timestep, pooled text and token-position embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of times ``t`` ``(B,)`` in [0, 1], computed in float32.

    The same embedding as Flux's ``timestep_embedding`` (black-forest-labs/flux ``modules/layers.py``,
    after Vaswani et al. 2017): ``t`` is scaled by ``time_factor`` so the frequencies resolve the schedule.
    """
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def grid_position_features(
    rows: int, cols: int, num_frequencies: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fourier features ``(rows*cols, 4*num_frequencies)`` of each token's (row, col), in packing order.

    Rows and columns are normalised to cell centres in (0, 1), so the features describe where a token sits
    in the image whatever the resolution; frequencies ``pi * 2^k`` (Tancik et al. 2020, Fourier features)
    resolve grids of up to ``2^num_frequencies`` cells per side. Token order is row-major, as in
    :func:`fluxguide.sampling.packing.pack` and Flux's image ids.
    """
    r = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) / rows
    c = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) / cols
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    coords = torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1)  # (seq, 2)
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32, device=device)
    args = (coords[:, :, None] * freqs).reshape(rows * cols, -1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def token_input_layers(
    latent_channels: int,
    dim: int,
    num_frequencies: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Linear, nn.Linear]:
    """The input projections of a per-token model, made in this order: ``[img, pred]`` (``2 * latent_channels
    -> dim``) and the position features of :func:`grid_position_features` (``4 * num_frequencies -> dim``)."""
    return (
        nn.Linear(2 * latent_channels, dim, device=device, dtype=dtype),
        nn.Linear(4 * num_frequencies, dim, device=device, dtype=dtype),
    )


def embed_tokens(
    channels_in: nn.Linear,
    position_in: nn.Linear,
    img: torch.Tensor,
    pred: torch.Tensor,
    grid: tuple[int, int],
    num_frequencies: int,
) -> torch.Tensor:
    """``(B, seq, dim)``: each token's ``[img, pred]`` channels and its position through the layers of
    :func:`token_input_layers`, summed, in the dtype of ``channels_in``."""
    dtype = channels_in.weight.dtype
    pos = grid_position_features(*grid, num_frequencies, device=img.device).to(dtype)
    return channels_in(torch.cat([img, pred], dim=-1).to(dtype)) + position_in(pos)[None]


class ConditionEmbedding(nn.Module):
    """Timestep and pooled-text conditioning ``(B, dim)``: an MLP on the sinusoidal time plus ``vec``.

    As Flux's ``time_in`` + ``vector_in`` (the sum conditions every block).
    """

    def __init__(
        self,
        dim: int,
        vec_dim: int | None,
        time_embed_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.time_embed_dim = time_embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, dim, **kw), nn.SiLU(), nn.Linear(dim, dim, **kw)
        )
        # vec_dim None: the time alone (a text-blind model ignores the pooled embedding)
        self.vec_proj = None if vec_dim is None else nn.Linear(vec_dim, dim, **kw)

    def forward(self, timestep: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        dtype = self.time_mlp[0].weight.dtype
        t_emb = self.time_mlp(timestep_embedding(timestep, self.time_embed_dim).to(dtype))
        return t_emb if self.vec_proj is None else t_emb + self.vec_proj(vec.to(dtype))


class AdaLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from the conditioning (adaLN, Peebles & Xie 2023, DiT)."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, device=device, dtype=dtype)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, seq, dim)``, ``cond`` ``(B, cond_dim)``."""
        shift, scale = self.modulation(cond)[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place: the output layer of a guidance model, so a new model outputs 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
