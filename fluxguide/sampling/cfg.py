"""Classifier-free guidance (Ho & Salimans 2022) as a BFL-signature model.

``v = v_uncond + scale * (v_cond - v_uncond)``. Wrapping the base model keeps :func:`denoise` unchanged:
the wrapper runs conditional and unconditional branches in one batched call (two model evaluations per
sample, which is what guidance distillation saves).
"""

from __future__ import annotations

import torch
from torch import nn

from fluxguide.sampling.conditioning import FluxModel


class ClassifierFreeGuidance(nn.Module):
    """A BFL-signature model that applies classifier-free guidance around ``model``.

    Args:
        model: the base velocity model.
        uncond_txt: unconditional (empty-prompt) token features ``(1, L, D)`` or ``(B, L, D)``.
        uncond_vec: unconditional pooled embedding ``(1, D)`` or ``(B, D)``.
        scale: CFG scale; 1 is the conditional model alone.
    """

    def __init__(self, model: FluxModel, uncond_txt: torch.Tensor, uncond_vec: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("uncond_txt", uncond_txt, persistent=False)
        self.register_buffer("uncond_vec", uncond_vec, persistent=False)
        self.scale = float(scale)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = img.shape[0]
        if self.scale == 1.0:
            return self.model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y, guidance=guidance)
        if self.uncond_txt.shape[1:] != txt.shape[1:]:
            raise ValueError(
                f"unconditional txt {tuple(self.uncond_txt.shape)} does not match txt {tuple(txt.shape)}: "
                "encode the empty prompt with the same text encoder and length"
            )
        u_txt = self.uncond_txt.expand(b, -1, -1)
        u_vec = self.uncond_vec.expand(b, -1)
        both = self.model(
            img=torch.cat([img, img]),
            img_ids=img_ids,
            txt=torch.cat([txt, u_txt.to(txt.dtype)]),
            txt_ids=txt_ids,
            timesteps=torch.cat([timesteps, timesteps]),
            y=torch.cat([y, u_vec.to(y.dtype)]),
            guidance=None if guidance is None else torch.cat([guidance, guidance]),
        )
        cond, uncond = both[:b], both[b:]
        return uncond + self.scale * (cond - uncond)
