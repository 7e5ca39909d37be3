"""Tests of :mod:`fluxguide.sampling`, with the tiny real models they share.

The base model is a real diffusers ``FluxTransformer2DModel`` (tiny random configuration, built in code)
behind the BFL ``flux`` model signature (:class:`fluxguide.backbones.bfl.BFLFlux`), and the guidance model is a small per-token MLP whose last layer
is zero-initialised, the way every fluxguide guidance network starts.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from fluxguide.backbones.bfl import BFLFlux

CHANNELS = 16
TXT_DIM = 32
VEC_DIM = 32


def fixed_tiny_flux(guidance_embeds: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> BFLFlux:
    """A 25k-parameter random Flux transformer (one double and one single block), frozen, in eval mode."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TXT_DIM,
        pooled_projection_dim=VEC_DIM,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=guidance_embeds,
    )
    return BFLFlux(transformer).to(dtype).eval().requires_grad_(False)


class TokenMLPGuidance(nn.Module):
    """Per-token MLP correction ``f(img, pred, t)``; a fresh one outputs exactly zero."""

    def __init__(self, channels: int = CHANNELS, hidden: int = 16, zero_init: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * channels + 1, hidden), nn.Tanh(), nn.Linear(hidden, channels))
        if zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        t: torch.Tensor,
        step_idx: int,
    ) -> torch.Tensor:
        t_tok = t.to(img.dtype)[:, None, None].expand(-1, img.shape[1], 1)
        return self.net(torch.cat([img, pred, t_tok], dim=-1))


def make_inputs(
    batch: int = 2,
    h: int = 4,
    w: int = 4,
    txt_len: int = 5,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Noise and conditioning for :func:`fluxguide.sampling.denoise` (keyword names of its signature)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "img": torch.randn(batch, h * w, CHANNELS, generator=g).to(dtype),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt": torch.randn(batch, txt_len, TXT_DIM, generator=g).to(dtype),
        "txt_ids": torch.zeros(txt_len, 3),
        "vec": torch.randn(batch, VEC_DIM, generator=g).to(dtype),
    }
