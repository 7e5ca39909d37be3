"""The LAION aesthetic predictor: published state-dict layout, loading, equality with a direct MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fluxguide.rewards import AestheticPredictor, AestheticReward, make_reward

# Key names and shapes of sac+logos+ava1-l14-linearMSE.pth (christophschuhmann/improved-aesthetic-predictor).
PUBLISHED_SHAPES = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def _direct_mlp(state: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """The published MLP by hand: linear layers 0, 2, 4, 6, 7 with no activations (dropout off at eval)."""
    x = embeddings / embeddings.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1)


def test_layout_matches_published_keys() -> None:
    predictor = AestheticPredictor()
    assert {k: tuple(v.shape) for k, v in predictor.state_dict().items()} == PUBLISHED_SHAPES
    kinds = [type(m).__name__ for m in predictor.layers]
    assert kinds == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]
    assert [m.p for m in predictor.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_published_state_dict_loads_and_equals_direct_mlp(tmp_path, fmt: str) -> None:
    state = _random_state_dict(PUBLISHED_SHAPES)
    path = tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}"
    torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    predictor = AestheticPredictor.from_file(path)
    assert not predictor.training  # dropout must be off for scoring
    emb = torch.randn(5, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = predictor(F.normalize(emb, dim=-1))
    torch.testing.assert_close(got, _direct_mlp(state, emb), rtol=1e-5, atol=1e-6)
    assert got.shape == (5,)


def test_reward_on_tiny_clip_equals_direct_computation(tiny_clip, tmp_path, images, prompts) -> None:
    model, _ = tiny_clip
    shapes = {
        "layers.0.weight": (32, 16), "layers.0.bias": (32,), "layers.2.weight": (16, 32), "layers.2.bias": (16,),
        "layers.4.weight": (8, 16), "layers.4.bias": (8,), "layers.6.weight": (4, 8), "layers.6.bias": (4,),
        "layers.7.weight": (1, 4), "layers.7.bias": (1,),
    }  # fmt: skip
    state = _random_state_dict(shapes, seed=3)
    path = tmp_path / "head.safetensors"
    save_file(state, str(path))
    predictor = AestheticPredictor.from_file(path, input_dim=16, hidden=(32, 16, 8, 4))
    reward = AestheticReward(model, predictor)
    with torch.no_grad():
        got = reward(images, prompts)
        # open_clip's default OpenAI mean / std: the tiny model's preprocess config.
        mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
        emb = model.encode_image((images - mean) / std)
    torch.testing.assert_close(got, _direct_mlp(state, emb), rtol=1e-5, atol=1e-6)

    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad.abs().sum() > 0

    # Through the registry, from the file.
    same = make_reward(
        "aesthetic", predictor_path=path, clip_model=model, input_dim=16, hidden=(32, 16, 8, 4)
    )
    with torch.no_grad():
        torch.testing.assert_close(same(images, prompts), got)


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path) -> None:
    state = _random_state_dict(PUBLISHED_SHAPES)
    missing = {k: v for k, v in state.items() if k != "layers.7.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layers.7.weight'\]"):
        AestheticPredictor.from_file(tmp_path / "missing.pth")

    extra = {**state, "layers.8.weight": torch.zeros(1, 1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.8.weight'\]"):
        AestheticPredictor.from_file(tmp_path / "extra.safetensors")

    torch.save(state, tmp_path / "good.pth")
    with pytest.raises(ValueError, match=r"layers.0.weight: checkpoint \(1024, 768\) vs model \(1024, 512\)"):
        AestheticPredictor.from_file(tmp_path / "good.pth", input_dim=512)


def test_pickled_module_and_missing_file_are_refused(tmp_path) -> None:
    torch.save(AestheticPredictor(8, (4,), ()), tmp_path / "module.pth")  # a whole pickled module
    with pytest.raises(ValueError, match="not a plain state dict"):
        AestheticPredictor.from_file(tmp_path / "module.pth", input_dim=8, hidden=(4,), dropouts=())
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        AestheticPredictor.from_file(tmp_path / "absent.pth")


def test_embedding_size_mismatch(tiny_clip) -> None:
    model, _ = tiny_clip
    with pytest.raises(ValueError, match="embeds images in 16 dimensions but the predictor takes 768"):
        AestheticReward(model, AestheticPredictor())
    with pytest.raises(ValueError, match=r"expects embeddings of shape \(B, 768\)"):
        AestheticPredictor()(torch.zeros(2, 16))
