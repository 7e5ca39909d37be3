"""StyleSimilarity: mean CLIP image-image cosine similarity to reference images."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fluxguide.rewards import StyleSimilarity


def _embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return F.normalize(model.encode_image((images - mean) / std), dim=-1)


def test_equals_mean_cosine_over_references(tiny_clip, images, prompts) -> None:
    model, _ = tiny_clip
    refs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    reward = StyleSimilarity(model, refs, scale=2.0)
    with torch.no_grad():
        got = reward(images, prompts)
        expected = 2.0 * (_embed(model, images) @ _embed(model, refs).T).mean(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_reference_itself_scores_one_and_gradient_flows(tiny_clip, images, prompts) -> None:
    model, _ = tiny_clip
    reward = StyleSimilarity(model, images[0])  # a single (3, H, W) reference
    x = images.clone().requires_grad_(True)
    out = reward(x, prompts)
    assert out.shape == (4,)
    torch.testing.assert_close(out[0], torch.tensor(1.0), rtol=0, atol=1e-5)
    assert (out[1:] < 0.9999).all()
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_bad_references(tiny_clip) -> None:
    model, _ = tiny_clip
    with pytest.raises(ValueError, match=r"references must be in \[0, 1\]"):
        StyleSimilarity(model, torch.rand(2, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="references must have 3 \\(RGB\\) channels"):
        StyleSimilarity(model, torch.rand(2, 1, 32, 32))
