"""build_policy: architectures sized for a backbone, the early-steps-only wrapper and the text-blind student."""

from __future__ import annotations

import pytest
import torch

from fluxguide.policies import TimestepRangeGuidance, load_guidance_model, save_guidance_model
from fluxguide.policies.registry import build_policy


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_min_t_guides_early_steps_only_and_survives_a_save(backbone, tmp_path):
    policy = _randomize(build_policy("attention", backbone, hidden_dim=16, num_layers=1, min_t=0.6))
    assert isinstance(policy, TimestepRangeGuidance)
    cond = backbone.encode(["a red bar", "a blue circle"])
    img = torch.randn(2, backbone.latent_seq, backbone.latent_channels)
    early = policy(img, img, cond.txt, cond.vec, torch.full((2,), 0.8), 2)
    late = policy(img, img, cond.txt, cond.vec, torch.full((2,), 0.4), 12)
    assert early.abs().max() > 1e-3 and torch.equal(late, torch.zeros_like(late))
    save_guidance_model(policy, tmp_path / "early.safetensors")
    loaded = load_guidance_model(tmp_path / "early.safetensors")
    assert torch.equal(loaded(img, img, cond.txt, cond.vec, torch.full((2,), 0.8), 2), early)


def test_text_blind_policy_is_built_by_name(backbone):
    policy = build_policy("attention", backbone, hidden_dim=16, num_layers=1, text_conditioning=False)
    assert policy.config["text_conditioning"] is False


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_t": 1.0}, "min_t must be in"),
    ({"min_t": -0.1}, "min_t must be in"),
    ({"text_conditioning": False, "name": "mlp"},
     r"text_conditioning=False: policy 'mlp' built a MLPGuidanceModel, which reads the prompt.*'affine', 'attention'"),
])
def test_bad_options_are_named(backbone, kwargs, match):
    name = kwargs.pop("name", "attention")
    with pytest.raises(ValueError, match=match):
        build_policy(name, backbone, hidden_dim=16, **kwargs)


def test_affine_and_coarse_policies_are_built_for_the_backbone(backbone):
    from fluxguide.policies import AffineGuidance, CoarseGuidance, project_coarse

    affine = build_policy("affine", backbone, hidden_dim=8)
    assert isinstance(affine, AffineGuidance) and affine.channels == 3 and affine.latent_channels == 48
    coarse = _randomize(build_policy("attention", backbone, hidden_dim=16, num_layers=1, coarse=True))
    assert isinstance(coarse, CoarseGuidance) and coarse.channels == 3
    cond = backbone.encode(["a red bar"])
    out = coarse(torch.randn(1, 64, 48), torch.randn(1, 64, 48), cond.txt, cond.vec, torch.tensor([0.7]), 2)
    assert out.abs().max() > 0
    torch.testing.assert_close(project_coarse(out, 3), out)
