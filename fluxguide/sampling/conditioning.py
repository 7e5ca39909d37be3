"""What the base model is conditioned on, in Flux's layout, and the one call of the base model at a time ``t``.

:class:`Conditioning` is the text side of a batch (``txt``, ``vec``) with Flux's position ids; every BFL-signature
model (a backbone, the BFL ``Flux`` module, a CFG wrapper) takes it as ``img_ids=, txt=, txt_ids=, y=``.
:func:`model_velocity` is the only place that builds the ``(B,)`` time and guidance tensors of such a call, so the
sampler, the envs, the backbones and the algorithms evaluate the model at a float time the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from fluxguide.sampling.packing import make_img_ids, make_txt_ids


class FluxModel(Protocol):
    """Anything with the BFL ``flux`` model signature returning the velocity ``(B, seq, C)``."""

    def __call__(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass
class Conditioning:
    """Text conditioning of a batch, in Flux's layout.

    Attributes:
        txt: token features ``(B, L, D_txt)``.
        vec: pooled text embedding ``(B, D_vec)``.
        txt_ids: text position ids ``(L, 3)``.
        img_ids: image position ids ``(seq, 3)``.
        prompts: the ``B`` prompt strings.
    """

    txt: torch.Tensor
    vec: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    prompts: list[str] = field(default_factory=list)

    @classmethod
    def in_flux_layout(
        cls, txt: torch.Tensor, vec: torch.Tensor, prompts: list[str], grid: tuple[int, int], device: torch.device
    ) -> Conditioning:
        """Encoder outputs as float32 conditioning on ``device``, with Flux's ids for a ``grid`` of
        ``(rows, cols)`` latent tokens."""
        return cls(
            txt=txt.to(device=device, dtype=torch.float32),
            vec=vec.to(device=device, dtype=torch.float32),
            txt_ids=make_txt_ids(txt.shape[1], device=device),
            img_ids=make_img_ids(*grid, device=device),
            prompts=prompts,
        )

    @property
    def batch_size(self) -> int:
        return self.txt.shape[0]

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each prompt ``n`` times in a row (``n`` samples per prompt, grouped)."""
        return replace(
            self,
            txt=self.txt.repeat_interleave(n, 0),
            vec=self.vec.repeat_interleave(n, 0),
            prompts=[p for p in self.prompts for _ in range(n)],
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        return replace(
            self,
            txt=self.txt.to(device=device, dtype=dtype),
            vec=self.vec.to(device=device, dtype=dtype),
            txt_ids=self.txt_ids.to(device=device, dtype=dtype),
            img_ids=self.img_ids.to(device=device, dtype=dtype),
        )


def model_velocity(
    model: FluxModel, img: torch.Tensor, t: torch.Tensor | float, cond: Conditioning, guidance: float | None = None
) -> torch.Tensor:
    """``model``'s prediction for the latents ``img`` ``(B, seq, C)`` at time ``t`` under ``cond``.

    Args:
        model: a BFL-signature model.
        img: the latents.
        t: a float (the same time for the whole batch, as a ``(B,)`` tensor in ``img``'s dtype and device) or a
            ``(B,)`` tensor, passed as it is.
        cond: the conditioning (``txt``, ``vec`` and the ids).
        guidance: the distilled guidance strength (a ``(B,)`` tensor in ``img``'s dtype), or ``None`` for a model
            without a guidance embedding.
    """
    if not isinstance(t, torch.Tensor):
        t = torch.full((img.shape[0],), float(t), device=img.device, dtype=img.dtype)
    g = None if guidance is None else torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    return model(img=img, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.vec,
                 guidance=g)
