"""Convolutional guidance (the seed's ``ConvGuidanceModel``, for spatial layout / composition).

Unpacks the token sequence to the latent image (``(B, in_channels, rows*p, cols*p)``), runs residual conv
blocks conditioned on the timestep and pooled text (the ResBlock of Ho et al. 2020, DDPM, with
scale-shift conditioning), and packs the result back to tokens. Two coordinate channels (CoordConv, Liu
et al. 2018) tell the network where each pixel sits, which zero padding alone only hints at.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from fluxguide.sampling.packing import pack, unpack
from fluxguide.policies.base import BaseGuidanceModel, CheckedNetwork, GuidanceInputs, as_grid, check_positive
from fluxguide.policies.embeddings import ConditionEmbedding, zero_module

if TYPE_CHECKING:
    from fluxguide.backbones.base import Backbone


def _group_norm(channels: int, device: torch.device | str | None, dtype: torch.dtype | None) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, device=device, dtype=dtype)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, GroupNorm modulated by the conditioning, SiLU-conv, residual.

    The conditioning scales and shifts the normalised features (the "scale-shift norm" of Nichol & Dhariwal
    2021): a shift added *before* a GroupNorm would be normalised away.
    """

    def __init__(
        self, channels: int, cond_dim: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = _group_norm(channels, **kw)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, **kw)
        self.cond_proj = nn.Linear(cond_dim, 2 * channels, **kw)
        self.norm2 = _group_norm(channels, **kw)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, **kw)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.cond_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        x = self.norm2(x) * (1 + scale) + shift
        return h + self.conv2(F.silu(x))


class ConvGuidanceModel(CheckedNetwork, BaseGuidanceModel, architecture="conv"):
    """Residual conv net on the unpacked latent grid.

    Args:
        in_channels: channels of the unpacked latent image (Flux: 16 VAE channels; the shapes world: 3).
        hidden_channels: width of the conv blocks.
        num_blocks: residual blocks.
        patch_size: the packing patch (Flux: 2; the shapes world: 4); packed ``C = in_channels * p^2``.
        vec_dim: width of the pooled text embedding (Flux: 768).
        grid_size: the token grid ``(rows, cols)``; ``None`` assumes a square grid of ``seq`` tokens.
        time_embed_dim: width of the sinusoidal timestep embedding.
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
        self,
        in_channels: int = 16,
        hidden_channels: int = 256,
        num_blocks: int = 3,
        patch_size: int = 2,
        vec_dim: int = 768,
        grid_size: int | tuple[int, int] | None = None,
        time_embed_dim: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive("ConvGuidanceModel", in_channels=in_channels, hidden_channels=hidden_channels,
                       patch_size=patch_size, vec_dim=vec_dim)
        if num_blocks < 0:  # zero blocks is a valid (stem-and-head) network
            raise ValueError(f"ConvGuidanceModel: num_blocks must be >= 0, got {num_blocks}")
        grid = as_grid(grid_size)
        self.register_config(
            in_channels=in_channels,
            hidden_channels=hidden_channels,
            num_blocks=num_blocks,
            patch_size=patch_size,
            vec_dim=vec_dim,
            grid_size=None if grid is None else list(grid),
            time_embed_dim=time_embed_dim,
        )
        self.in_channels, self.patch_size = in_channels, patch_size
        self.latent_channels = in_channels * patch_size**2
        self.vec_dim, self.grid_size = vec_dim, grid
        kw = {"device": device, "dtype": dtype}
        self.cond = ConditionEmbedding(hidden_channels, vec_dim, time_embed_dim, **kw)
        # Input: img and pred unpacked (2 * in_channels) plus the (row, col) coordinate channels.
        self.stem = nn.Conv2d(2 * in_channels + 2, hidden_channels, 3, padding=1, **kw)
        self.blocks = nn.ModuleList(
            _ResBlock(hidden_channels, hidden_channels, **kw) for _ in range(num_blocks)
        )
        self.out_norm = _group_norm(hidden_channels, **kw)
        self.out = zero_module(nn.Conv2d(hidden_channels, in_channels, 3, padding=1, **kw))

    @classmethod
    def for_backbone(cls, backbone: Backbone, *, hidden_dim: int, num_layers: int, vec_dim: int,
                     grid_size: tuple[int, int], device: torch.device | str) -> ConvGuidanceModel:
        """``build_policy("conv", backbone)``: on the backbone's unpacked image channels, patch and token grid."""
        return cls(in_channels=backbone.image_channels, hidden_channels=hidden_dim, num_blocks=num_layers,
                   patch_size=backbone.pixel_patch, vec_dim=vec_dim, grid_size=grid_size, device=device)

    def compute(
        self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> torch.Tensor:
        dtype = self.stem.weight.dtype
        rows, cols = inputs.grid
        height, width = rows * self.patch_size, cols * self.patch_size
        x = torch.cat(
            [unpack(img, height, width, self.patch_size), unpack(pred, height, width, self.patch_size)], 1
        )
        ys = torch.linspace(-1, 1, height, device=img.device, dtype=dtype)
        xs = torch.linspace(-1, 1, width, device=img.device, dtype=dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(x.shape[0], -1, -1, -1)
        h = self.stem(torch.cat([x.to(dtype), coords], dim=1))
        cond = self.cond(inputs.timestep, vec)
        for block in self.blocks:
            h = block(h, cond)
        out = self.out(F.silu(self.out_norm(h)))
        return pack(out, self.patch_size).to(pred.dtype)
