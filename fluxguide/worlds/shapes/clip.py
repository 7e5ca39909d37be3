"""The shapes world's tiny CLIP: an open_clip model registered under its own name.

Registering the config through ``open_clip.add_model_config`` makes the model loadable with open_clip's
standard calls, e.g. ``open_clip.create_model_and_transforms(SHAPES_CLIP_NAME, pretrained=<file>)`` and
``open_clip.get_tokenizer(SHAPES_CLIP_NAME)``. Its text tower is the world's text encoder.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from fluxguide.rewards.open_clip_models import quiet_random_init_warning

SHAPES_CLIP_NAME = "fluxguide-shapes-clip"
CONFIG_PATH = Path(__file__).with_name(f"{SHAPES_CLIP_NAME}.json")
# open_clip's default normalisation, so its standard transforms and fluxguide's torch preprocessing agree.
IMAGE_MEAN = open_clip.OPENAI_DATASET_MEAN
IMAGE_STD = open_clip.OPENAI_DATASET_STD


def register_shapes_clip() -> None:
    """Add the tiny CLIP's config to open_clip's registry (idempotent)."""
    if SHAPES_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


def create_shapes_clip(checkpoint: str | Path | None = None, device: torch.device | str = "cpu") -> open_clip.CLIP:
    """Build the tiny CLIP with open_clip, optionally loading a checkpoint file (safetensors).

    Without a checkpoint the model is random, as asked (the world's loaders put their weights in right after),
    so open_clip's "No pretrained weights loaded ... Model initialized randomly" warning is not logged.
    """
    register_shapes_clip()
    if checkpoint is not None:
        return open_clip.create_model(SHAPES_CLIP_NAME, pretrained=str(checkpoint), device=device)
    with quiet_random_init_warning():
        return open_clip.create_model(SHAPES_CLIP_NAME, pretrained=None, device=device)


def shapes_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's tokenizer for the tiny CLIP (context length 16)."""
    register_shapes_clip()
    return open_clip.get_tokenizer(SHAPES_CLIP_NAME)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the tiny CLIP's input normalisation (differentiable)."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def encode_text_tokens(model: open_clip.CLIP, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features ``(B, L, width)`` (after the final layer norm) and the projected pooled embedding ``(B, E)``.

    The same computation as ``CLIP.encode_text`` (open_clip ``model.py``), keeping the per-token features that
    Flux's joint attention consumes as ``txt``; the pooled embedding is Flux's ``vec``.
    """
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    pooled = pooled @ model.text_projection
    return x, pooled


def contrastive_loss(model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric CLIP loss with every image/caption pair of identical captions counted as a positive.

    A small grammar repeats captions inside a batch; treating duplicates as negatives (plain InfoNCE) would
    push apart embeddings that should be equal, so the targets are row-normalised "same caption" masks.
    """
    img = F.normalize(model.encode_image(normalize_images(images)), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions], device=images.device)
    same = (cid[:, None] == cid[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
