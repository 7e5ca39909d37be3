"""CLIPScore: loading from files and tags, equality with open_clip's own computation, caching, gradients."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fluxguide.rewards import CLIPScore, load_open_clip


def _direct_score(
    model: torch.nn.Module, tokenizer, images: torch.Tensor, prompts: list[str]
) -> torch.Tensor:
    """The score computed with open_clip's own calls: normalise, encode_image / encode_text, cosine."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    img = F.normalize(model.encode_image((images - mean) / std), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    return (img * txt).sum(-1)


@pytest.fixture(scope="module")
def registered_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_clip_cfg: dict) -> str:
    """Register the tiny architecture through open_clip's own add_model_config, as a user would."""
    name = "fluxguide-test-tiny-clip-registered"
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{name}.json"
    path.write_text(json.dumps(tiny_clip_cfg))
    open_clip.add_model_config(path)
    return name


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_score_of_saved_and_reloaded_model_equals_open_clip_direct(
    registered_tiny: str, tmp_path, images, prompts, fmt: str
) -> None:
    torch.manual_seed(123)
    original = open_clip.create_model(registered_tiny).eval()
    tokenizer = open_clip.get_tokenizer(registered_tiny)
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    path = tmp_path / ("tiny.safetensors" if fmt == "safetensors" else "tiny.pt")
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)

    reward = CLIPScore.from_pretrained(registered_tiny, pretrained=path)
    with torch.no_grad():
        got = reward(images, prompts)
        expected = _direct_score(original, tokenizer, images, prompts)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # A different random model scores differently: the loaded weights are the ones used.
    torch.manual_seed(7)
    other = open_clip.create_model(registered_tiny).eval()
    with torch.no_grad():
        assert (_direct_score(other, tokenizer, images, prompts) - got).abs().max() > 1e-3


def test_model_cfg_dict_loading_and_scale(tiny_clip_cfg, tmp_path, images, prompts) -> None:
    torch.manual_seed(5)
    original, tokenizer = load_open_clip("fluxguide-test-tiny-clip-dict", None, model_cfg=tiny_clip_cfg)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    reward = CLIPScore.from_pretrained(
        "fluxguide-test-tiny-clip-dict", path, model_cfg=tiny_clip_cfg, scale=2.5, cache_text=False
    )
    with torch.no_grad():
        expected = 2.5 * _direct_score(original, tokenizer, images, prompts)
        torch.testing.assert_close(reward(images, prompts), expected, rtol=0, atol=1e-6)
    # The same name with a different architecture is refused rather than silently replaced.
    other_cfg = {**tiny_clip_cfg, "embed_dim": 8}
    with pytest.raises(ValueError, match="already has a different config named"):
        load_open_clip("fluxguide-test-tiny-clip-dict", None, model_cfg=other_cfg)


def test_checkpoint_with_missing_keys_is_a_clear_error(tiny_clip, tmp_path) -> None:
    model, _ = tiny_clip
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "visual.proj"}
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="visual.proj"):
        CLIPScore.from_pretrained("fluxguide-test-tiny-clip", path)


def test_missing_file_and_unknown_architecture(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        CLIPScore.from_pretrained("fluxguide-test-tiny-clip", tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope-99'"):
        CLIPScore.from_pretrained("ViT-Nope-99", None)


def test_gradient_reaches_pixels_through_resize(tiny_clip, prompts) -> None:
    model, tokenizer = tiny_clip
    reward = CLIPScore(model, tokenizer)
    images = torch.rand(4, 3, 48, 64, requires_grad=True)  # resized + centre-cropped to 32x32 in torch
    reward(images, prompts).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.isfinite(images.grad).all()


def test_text_cache_matches_uncached_and_encodes_each_prompt_once(tiny_clip, images, prompts) -> None:
    model, tokenizer = tiny_clip
    seen: list[str] = []

    def counting_tokenizer(texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        return tokenizer(texts)

    cached = CLIPScore(model, counting_tokenizer, text_cache_size=2)
    uncached = CLIPScore(model, tokenizer, cache_text=False)
    with torch.no_grad():
        first = cached(images, prompts)
        second = cached(images, prompts)
        torch.testing.assert_close(first, uncached(images, prompts), rtol=0, atol=1e-6)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    # 3 distinct prompts, cache of 2: the first call encodes 3, the second re-encodes the evicted one.
    assert len(seen) == 3 + 1
    assert len(cached._text_cache) == 2
    cached.clear_text_cache()
    assert len(cached._text_cache) == 0


def test_bf16_model_returns_float32(images, prompts) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_open_clip("fluxguide-test-tiny-clip", None, precision="bf16")
    reward = CLIPScore(model, tokenizer)
    out = reward(images, prompts)
    assert out.dtype == torch.float32 and out.shape == (4,) and torch.isfinite(out).all()
