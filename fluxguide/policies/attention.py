"""Attention guidance (the seed's ``AttentionGuidanceModel``, "more powerful", for prompt adherence).

Transformer blocks over the latent tokens: self-attention (tokens see each other and, through a Fourier
position embedding, where they sit), cross-attention to the text tokens ``txt``, and an MLP, each
modulated by the timestep and pooled text through adaLN (DiT, Peebles & Xie 2023).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

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


class _Attention(nn.Module):
    """Multi-head attention with RMS-normalised queries and keys (QK-norm, as in Flux's blocks)."""

    def __init__(
        self, dim: int, num_heads: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, **kw)
        self.kv = nn.Linear(dim, 2 * dim, **kw)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6, **kw)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6, **kw)
        self.proj = nn.Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class _Block(nn.Module):
    """Self-attention, cross-attention to the text, MLP; pre-norm residuals, adaLN on the image stream."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        cross_attention: bool = True,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm_self = AdaLayerNorm(dim, dim, **kw)
        self.self_attn = _Attention(dim, num_heads, **kw)
        # a text-blind block has no cross-attention (its parameters do not exist, so nothing trains them)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6, **kw) if cross_attention else None
        self.cross_attn = _Attention(dim, num_heads, **kw) if cross_attention else None
        self.norm_mlp = AdaLayerNorm(dim, dim, **kw)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **kw), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim, **kw)
        )

    def forward(self, h: torch.Tensor, txt: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(h, cond)
        h = h + self.self_attn(x, x)
        if self.cross_attn is not None:
            h = h + self.cross_attn(self.norm_cross(h), txt)
        return h + self.mlp(self.norm_mlp(h, cond))


class AttentionGuidanceModel(CheckedNetwork, BaseGuidanceModel, architecture="attention"):
    """Transformer guidance with self-attention over latent tokens and cross-attention to ``txt``.

    Args:
        hidden_dim: token width (divisible by ``num_heads``).
        num_heads: attention heads.
        num_layers: transformer blocks.
        latent_channels: channels ``C`` of packed latents (Flux: 64; the shapes world: 48).
        txt_dim: width of the text token features (Flux: 4096, T5-XXL).
        vec_dim: width of the pooled text embedding (Flux: 768, CLIP-L).
        mlp_ratio: MLP width as a multiple of ``hidden_dim``.
        grid_size: the token grid ``(rows, cols)``; ``None`` assumes a square grid of ``seq`` tokens.
        pos_frequencies: Fourier frequencies per axis of the position embedding.
        time_embed_dim: width of the sinusoidal timestep embedding.
        text_conditioning: read ``txt`` (cross-attention) and ``vec`` (adaLN). ``False`` builds a *text-blind*
            model that sees only ``img``, ``pred`` and ``t``. That is enough for classifier-free guidance, whose
            correction ``(w - 1) * (pred - pred_uncond(img, t))`` depends on the prompt only through ``pred``:
            a text-blind policy cannot tie what it learns to the words of the prompts it was trained on
            (docs/guide.md, "What the policy may see and when it acts").
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
        self,
        hidden_dim: int = 1024,
        num_heads: int = 8,
        num_layers: int = 2,
        latent_channels: int = 64,
        txt_dim: int = 4096,
        vec_dim: int = 768,
        mlp_ratio: float = 4.0,
        grid_size: int | tuple[int, int] | None = None,
        pos_frequencies: int = 8,
        time_embed_dim: int = 256,
        text_conditioning: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or hidden_dim % num_heads:
            raise ValueError(
                f"AttentionGuidanceModel: hidden_dim ({hidden_dim}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        check_positive("AttentionGuidanceModel", latent_channels=latent_channels, txt_dim=txt_dim,
                       vec_dim=vec_dim, num_layers=num_layers, pos_frequencies=pos_frequencies,
                       mlp_ratio=mlp_ratio)
        grid = as_grid(grid_size)
        self.register_config(
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            latent_channels=latent_channels,
            txt_dim=txt_dim,
            vec_dim=vec_dim,
            mlp_ratio=mlp_ratio,
            grid_size=None if grid is None else list(grid),
            pos_frequencies=pos_frequencies,
            time_embed_dim=time_embed_dim,
            **({} if text_conditioning else {"text_conditioning": False}),  # older configs stay as they were
        )
        self.latent_channels, self.txt_dim, self.vec_dim, self.grid_size = (
            latent_channels,
            txt_dim,
            vec_dim,
            grid,
        )
        self.pos_frequencies, self.text_aware = pos_frequencies, text_conditioning
        kw = {"device": device, "dtype": dtype}
        self.cond = ConditionEmbedding(hidden_dim, vec_dim if text_conditioning else None, time_embed_dim, **kw)
        self.img_in, self.pos_proj = token_input_layers(latent_channels, hidden_dim, pos_frequencies, **kw)
        self.txt_in = nn.Sequential(
            nn.Linear(txt_dim, hidden_dim, **kw), nn.LayerNorm(hidden_dim, eps=1e-6, **kw)
        ) if text_conditioning else None
        self.blocks = nn.ModuleList(
            _Block(hidden_dim, num_heads, mlp_ratio, cross_attention=text_conditioning, **kw) for _ in range(num_layers)
        )
        self.out_norm = AdaLayerNorm(hidden_dim, hidden_dim, **kw)
        self.out = zero_module(nn.Linear(hidden_dim, latent_channels, **kw))

    @classmethod
    def for_backbone(cls, backbone: Backbone, *, hidden_dim: int, num_layers: int, num_heads: int,
                     text_conditioning: bool, vec_dim: int, txt_dim: int, grid_size: tuple[int, int],
                     device: torch.device | str) -> AttentionGuidanceModel:
        """``build_policy("attention", backbone)``: sized for the backbone's latents, text and token grid."""
        return cls(hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                   latent_channels=backbone.latent_channels, txt_dim=txt_dim, mlp_ratio=2.0,
                   text_conditioning=text_conditioning, vec_dim=vec_dim, grid_size=grid_size, device=device)

    def compute(
        self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, inputs: GuidanceInputs
    ) -> torch.Tensor:
        cond = self.cond(inputs.timestep, vec)
        h = embed_tokens(self.img_in, self.pos_proj, img, pred, inputs.grid, self.pos_frequencies)
        txt_h = None if self.txt_in is None else self.txt_in(txt.to(self.img_in.weight.dtype))
        for block in self.blocks:
            h = block(h, txt_h, cond)
        return self.out(self.out_norm(h, cond)).to(pred.dtype)
