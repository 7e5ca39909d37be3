"""Packing image-shaped latents into Flux's token sequence and back, and Flux's position ids."""

from __future__ import annotations

import torch
from einops import rearrange


def pack(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``(B, C, H, W) -> (B, (H/p)(W/p), C p p)``: the token layout of Flux (and the shapes world)."""
    if x.ndim != 4 or x.shape[-1] % patch or x.shape[-2] % patch:
        raise ValueError(f"pack needs (B, C, H, W) with H and W divisible by {patch}, got {tuple(x.shape)}")
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)


def unpack(x: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack`: ``height`` and ``width`` are the unpacked spatial size."""
    h, w = height // patch, width // patch
    if x.ndim != 3 or x.shape[1] != h * w:
        raise ValueError(f"unpack to {height}x{width} (patch {patch}) needs (B, {h * w}, C), got {tuple(x.shape)}")
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=patch, pw=patch)


def make_img_ids(h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flux's image position ids ``(h*w, 3)``: ``[0, row, col]`` per token (rows major)."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def make_txt_ids(length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flux's text position ids: all zeros, ``(length, 3)``."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
