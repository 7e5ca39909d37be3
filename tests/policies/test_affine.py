"""The affine schedule policy: zero at init, exactly a(t) img + b(t) pred per channel, saved and rebuilt."""

from __future__ import annotations

import pytest
import torch

from fluxguide.policies import AffineGuidance, load_guidance_model, save_guidance_model
from fluxguide.policies.embeddings import timestep_embedding


def test_affine_guidance_is_a_per_channel_schedule_of_img_and_pred(world, make_observation, tmp_path):
    obs = make_observation(world)
    model = AffineGuidance(world.channels, world.in_channels, time_dim=16)
    call = (obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], 3)
    assert model(*call).abs().max() == 0  # zero-initialised: the base sampler
    with torch.no_grad():
        model.coefficients.weight.normal_(0, 0.3)
        model.coefficients.bias.normal_(0, 0.3)
    out = model(*call)
    coef = model.coefficients(timestep_embedding(obs["t"], 16)).detach()
    group = world.channels // world.in_channels
    for c in range(world.in_channels):  # channel c owns token entries c*group ... (c+1)*group - 1
        sl = slice(c * group, (c + 1) * group)
        a, b = coef[:, c, None, None], coef[:, world.in_channels + c, None, None]
        expected = a * obs["img"][..., sl] + b * obs["pred"][..., sl]
        torch.testing.assert_close(out[..., sl], expected)
    save_guidance_model(model, tmp_path / "affine.safetensors")
    loaded = load_guidance_model(tmp_path / "affine.safetensors")
    assert isinstance(loaded, AffineGuidance)
    assert sum(p.numel() for p in loaded.parameters()) == 17 * 2 * world.in_channels  # (16 weights + bias) x 2C
    torch.testing.assert_close(loaded(*call), out)


def test_affine_guidance_rejects_bad_sizes(world, make_observation):
    with pytest.raises(ValueError, match="multiple of channels=5"):
        AffineGuidance(world.channels, 5)
    obs = make_observation(world)
    model = AffineGuidance(world.channels + world.in_channels, world.in_channels)
    with pytest.raises(ValueError, match=str(world.channels)):
        model(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], 0)
