"""CLIPPreprocess: the torch preprocessing agrees with open_clip's own (PIL) eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from fluxguide.rewards import CLIPPreprocess


@pytest.mark.parametrize(
    ("shape", "size", "mode"),
    [
        ((48, 64), 32, "shortest"),
        ((64, 48), 32, "squash"),
        ((24, 40), 32, "longest"),
        ((20, 30), (24, 32), "shortest"),
        ((32, 32), 32, "shortest"),
    ],
)
def test_matches_open_clip_pil_transform(shape: tuple[int, int], size, mode: str) -> None:
    # Smooth 8-bit images, so the only differences are PIL's vs torch's interpolation kernels and rounding.
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=shape, mode="bilinear")
    x = (x * 255).round() / 255
    cfg = PreprocessCfg(size=size, resize_mode=mode)
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = image_transform_v2(cfg, is_train=False)(pil)
    got = CLIPPreprocess(size, cfg.mean, cfg.std, resize_mode=mode)(x)[0]
    assert got.shape == expected.shape
    # 0.03 in normalised units is about 2/255 in pixels; a one-pixel crop offset gives ~0.5.
    assert (got - expected).abs().max() < 0.03


def test_same_size_is_exact_normalisation_and_differentiable() -> None:
    pre = CLIPPreprocess(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = pre(x)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std, rtol=0, atol=0)
    big = torch.rand(2, 3, 64, 80, requires_grad=True)
    pre(big).square().sum().backward()
    assert big.grad.abs().sum() > 0


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="interpolation must be one of"):
        CLIPPreprocess(32, (0.5,), (0.5,), interpolation="lanczos")
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        CLIPPreprocess(32, (0.5,), (0.5,), resize_mode="crop")
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        CLIPPreprocess(32, (0.5, 0.5), (0.5,))
