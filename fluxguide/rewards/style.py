"""Style similarity: CLIP image-image cosine similarity to reference images (the seed's "Style Control").

The reward of an image is the mean over references of ``scale * cos(E_img(image), E_img(reference))``.
Reference embeddings are computed once, without gradients, and kept as a buffer (they follow ``.to()``).
Prompts are accepted for the common contract and ignored.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fluxguide.rewards.base import RewardModel
from fluxguide.rewards.inputs import check_images
from fluxguide.rewards.open_clip_models import image_embeddings, load_open_clip, model_device
from fluxguide.rewards.preprocess import CLIPPreprocess


class StyleSimilarity(RewardModel):
    """Mean CLIP image-image cosine similarity to one or more reference images.

    Args:
        model: an open_clip model.
        references: reference images ``(R, 3, H, W)`` (or one ``(3, H, W)``) in [0, 1], any size.
        scale: multiplies the cosine similarity.
        preprocess: image preprocessing; by default the model's own open_clip preprocess config.
    """

    differentiable = True
    reference_embeddings: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        references: torch.Tensor,
        *,
        scale: float = 1.0,
        preprocess: CLIPPreprocess | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(model, "encode_image"):
            raise TypeError(
                f"model must be an open_clip model with encode_image, got {type(model).__name__}."
            )
        self.model = model
        self.scale = float(scale)
        self.preprocess = preprocess if preprocess is not None else CLIPPreprocess.from_model(model)
        self.register_buffer("reference_embeddings", torch.empty(0), persistent=False)
        self.set_references(references)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | os.PathLike[str] | None,
        references: torch.Tensor,
        *,
        model_cfg: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        **kwargs: Any,
    ) -> StyleSimilarity:
        """Build from an open_clip architecture name and a local checkpoint file or pretrained tag."""
        model, _ = load_open_clip(
            model_name, pretrained, model_cfg=model_cfg, device=device, precision=precision
        )
        return cls(model, references.to(device), **kwargs)

    @torch.no_grad()
    def set_references(self, references: torch.Tensor) -> None:
        """Replace the reference images ``(R, 3, H, W)`` in [0, 1]."""
        if isinstance(references, torch.Tensor) and references.ndim == 3:
            references = references.unsqueeze(0)
        check_images(references, tolerance=self.range_tolerance, name="references")
        device = model_device(self.model)
        self.reference_embeddings = image_embeddings(self.model, self.preprocess, references.to(device))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = image_embeddings(self.model, self.preprocess, images)
        refs = self.reference_embeddings.to(img.device)
        return self.scale * (img @ refs.T).mean(dim=-1)

    def extra_repr(self) -> str:
        return f"num_references={self.reference_embeddings.shape[0]}, scale={self.scale}"
