"""CLIP image preprocessing in torch, so gradients reach the pixels.

open_clip's own eval transform works on PIL images (resize, centre crop, ``ToTensor``, normalise) and
so cuts the graph. :class:`CLIPPreprocess` does the same steps on ``(B, 3, H, W)`` tensors in [0, 1]:
the resize modes of open_clip's ``image_transform`` ('shortest': shorter side to the input size then
centre crop; 'squash': straight to the input size; 'longest': longer side to the input size then pad),
antialiased interpolation like PIL's, then normalisation with the model's mean and std.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_RESIZE_MODES = ("shortest", "squash", "longest")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size}.")
    return size  # type: ignore[return-value]


class CLIPPreprocess(nn.Module):
    """Resize and normalise images for a CLIP image tower, differentiably.

    Args:
        size: the tower's input size, an int or ``(height, width)``.
        mean: per-channel mean the tower was trained with.
        std: per-channel std the tower was trained with.
        interpolation: 'bicubic', 'bilinear' or 'nearest'.
        resize_mode: 'shortest', 'squash' or 'longest' (open_clip's names).
        fill_color: padding value (0-255, as in open_clip) for 'longest'.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        fill_color: int = 0,
    ) -> None:
        super().__init__()
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}.")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}.")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 1:
            mean_t = mean_t.repeat(3)
        if std_t.numel() == 1:
            std_t = std_t.repeat(3)
        if mean_t.numel() != 3 or std_t.numel() != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean_t.tolist()} and {std_t.tolist()}.")
        self.size = _pair(size)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.fill_color = fill_color
        # Non-persistent: preprocessing constants are configuration, not weights.
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> CLIPPreprocess:
        """The preprocessing an open_clip model was created with (``open_clip.get_model_preprocess_cfg``)."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        if "size" not in cfg or "mean" not in cfg or "std" not in cfg:
            raise ValueError(
                f"{type(model).__name__} has no complete open_clip preprocess config (got {cfg}); build "
                f"CLIPPreprocess(size, mean, std) yourself and pass it as preprocess=."
            )
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in _INTERPOLATIONS:
            # open_clip's eval transform treats anything but 'bilinear' (e.g. 'random') as bicubic.
            if interpolation != "random":
                warnings.warn(f"interpolation {interpolation!r} is not supported in torch; using bicubic.")
            interpolation = "bicubic"
        return cls(
            cfg["size"],
            cfg["mean"],
            cfg["std"],
            interpolation=interpolation,
            resize_mode=cfg.get("resize_mode", "shortest"),
            fill_color=cfg.get("fill_color", 0),
        )

    def _resize(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(images.shape[-2:]) == size:
            return images
        kwargs = {} if self.interpolation == "nearest" else {"align_corners": False, "antialias": True}
        out = F.interpolate(images, size=size, mode=self.interpolation, **kwargs)
        # PIL clamps bicubic overshoot when it writes 8-bit pixels; do the same so values stay in [0, 1].
        return out.clamp(0.0, 1.0) if self.interpolation == "bicubic" else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` images in [0, 1] to the normalised ``(B, 3, *size)`` tower input."""
        h, w = images.shape[-2:]
        th, tw = self.size
        if self.resize_mode == "squash":
            x = self._resize(images, (th, tw))
        else:
            x = self._resize(images, self._keep_ratio_size(h, w))
            x = self._center_crop_or_pad(x, th, tw)
        # The buffers follow .to(), but a preprocess built beside a model already on an accelerator starts
        # on the CPU; move them to the images rather than failing.
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype)
        return (x - mean) / std

    def _keep_ratio_size(self, h: int, w: int) -> tuple[int, int]:
        """Size after scaling so the shorter ('shortest') or longer ('longest') side fits the target."""
        th, tw = self.size
        if self.resize_mode == "shortest" and th == tw:
            # open_clip uses torchvision's Resize(int) here, which truncates the long side.
            if h <= w:
                return th, max(1, int(th * w / h))
            return max(1, int(tw * h / w)), tw
        # Otherwise open_clip's ResizeKeepRatio, which rounds.
        ratios = (h / th, w / tw)
        ratio = min(ratios) if self.resize_mode == "shortest" else max(ratios)
        return max(1, round(h / ratio)), max(1, round(w / ratio))

    def _center_crop_or_pad(self, x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < th or w < tw:
            pad_h, pad_w = max(th - h, 0), max(tw - w, 0)
            # Same split as torchvision's CenterCrop padding: the extra pixel goes after.
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            x = F.pad(x, pad, value=self.fill_color / 255.0)
            h, w = x.shape[-2:]
        top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
        return x[..., top : top + th, left : left + tw]

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation!r}, resize_mode={self.resize_mode!r}"
