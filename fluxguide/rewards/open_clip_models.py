"""Loading open_clip models and computing their normalised embeddings, shared by the CLIP-based rewards.

Weights come from a local checkpoint file (open_clip state dict, ``.safetensors`` or a ``torch.save``
file, loaded with ``weights_only=True``) or an open_clip pretrained tag. A tag is resolved by open_clip,
which reads its local cache and reaches the hub only when the weights are not there yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluxguide.rewards.preprocess import CLIPPreprocess

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ... Model initialized randomly." only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("No pretrained weights loaded for model") and "initialized randomly" in message)


@contextlib.contextmanager
def quiet_random_init_warning() -> Iterator[None]:
    """Silence open_clip's "Model initialized randomly" warning (logged on the root logger by
    ``open_clip.create_model`` without ``pretrained``) for callers that load the real weights right after it,
    where the warning misdescribes what happened. Every other log record passes."""
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _register_config(model_name: str, model_cfg: dict[str, Any], directory: Path) -> None:
    """Register ``model_cfg`` with open_clip under ``model_name`` (open_clip's ``add_model_config``)."""
    import open_clip

    existing = open_clip.get_model_config(model_name)
    if existing is not None and existing != model_cfg:
        raise ValueError(
            f"open_clip already has a different config named {model_name!r}; give your config another "
            f"model_name (or pass model_cfg=None to use the registered one)."
        )
    if existing is None:
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
        if missing:
            raise ValueError(f"model_cfg for {model_name!r} lacks the open_clip keys {missing}.")
        # open_clip registers architectures from JSON files; the registry keeps them once scanned.
        path = directory / f"{model_name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def load_open_clip(
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    model_cfg: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    freeze: bool = True,
) -> tuple[nn.Module, Any]:
    """Build an open_clip model and its tokenizer.

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``), or the name to register
            ``model_cfg`` under.
        pretrained: a local checkpoint file, an open_clip pretrained tag (e.g. ``"openai"``; see
            ``open_clip.list_pretrained_tags_by_model(model_name)``), or ``None`` for random weights.
        model_cfg: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for an
            architecture open_clip does not ship, registered under ``model_name``.
        device: where to put the model.
        precision: open_clip precision ('fp32', 'bf16', 'fp16', 'pure_bf16', ...).
        freeze: put the model in eval mode with ``requires_grad=False`` parameters (a reward's weights are
            fixed; gradients still reach the pixels).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: ``pretrained`` looks like a file path and does not exist.
        ValueError: unknown architecture name, or a conflicting ``model_cfg``.
    """
    import open_clip

    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        looks_like_path = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
        if looks_like_path and not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"CLIP checkpoint {pretrained!r} does not exist; pass an existing open_clip state-dict file "
                f"(.safetensors or torch.save) or a pretrained tag."
            )
    with tempfile.TemporaryDirectory(prefix="fluxguide-open-clip-") as tmp:
        if model_cfg is not None:
            _register_config(model_name, model_cfg, Path(tmp))
        if open_clip.get_model_config(model_name.replace("/", "-")) is None and ":" not in model_name:
            raise ValueError(
                f"unknown open_clip architecture {model_name!r}; choose one of open_clip.list_models() "
                f"(e.g. 'ViT-B-32', 'ViT-L-14') or pass model_cfg= to define it."
            )
        model = open_clip.create_model(
            model_name, pretrained=pretrained, device=device, precision=precision, weights_only=True
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    if freeze:
        model.eval().requires_grad_(False)
    return model, tokenizer


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's image tower takes as input: that of its first convolution or linear layer.

    Not simply the first parameter's: open_clip's mixed 'bf16' / 'fp16' precision casts the layers to low
    precision but leaves embeddings such as ``class_embedding`` in float32.
    """
    tower = getattr(model, "visual", model)
    for module in tower.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight.dtype
    for p in tower.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def embed_dim(model: nn.Module) -> int | None:
    """The joint embedding dimension of an open_clip model, if it can be read without a forward pass."""
    out = getattr(getattr(model, "visual", None), "output_dim", None)
    return int(out) if isinstance(out, int) else None


def image_embeddings(model: nn.Module, preprocess: CLIPPreprocess, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 image embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in [0, 1]."""
    x = preprocess(images).to(model_dtype(model))
    return F.normalize(model.encode_image(x).float(), dim=-1)


def text_embeddings(
    model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """L2-normalised float32 text embeddings ``(N, D)`` of ``prompts``."""
    tokens = tokenizer(prompts).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)
