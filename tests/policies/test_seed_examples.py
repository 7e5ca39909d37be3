"""The seed's examples for creating, saving and loading guidance models, with ``fluxguide`` paths.

The seed ("Getting Started: Custom Guidance for Flux Sampling") shows the constructors at Flux-dev sizes and
a ``model_state_dict`` checkpoint; sampling runs here on a tiny random Flux with Flux-dev's interface
(64 latent channels, T5 width 4096, CLIP width 768, distilled guidance).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from fluxguide.policies import (
    AttentionGuidanceModel,
    BaseGuidanceModel,
    ConvGuidanceModel,
    MLPGuidanceModel,
    MultiObjectiveGuidance,
    build_guidance_model,
    create_mlp_guidance_model,
)
from fluxguide.sampling import denoise, get_schedule
from fluxguide.sampling.packing import make_img_ids, make_txt_ids


def tiny_flux_dev_interface():
    """A tiny random transformer that takes Flux-dev's inputs (a stand-in for ``flux_model``)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,
    ).eval()  # fmt: skip

    def flux_model(img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        return transformer(
            hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=timesteps,
            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
        )[0]  # fmt: skip

    return flux_model


def test_seed_examples(tmp_path):
    # Step 2, option A: create a model.
    model = MLPGuidanceModel(latent_channels=64, hidden_dim=1024)
    assert isinstance(model, BaseGuidanceModel)

    # Step 4: create, (train), save.
    guidance_model = create_mlp_guidance_model(
        latent_channels=64,
        hidden_dim=1024,
        num_layers=3,
    )
    with torch.no_grad():
        guidance_model.out.weight.normal_(0, 1e-3)  # "training" changed the weights
    torch.save({"model_state_dict": guidance_model.state_dict()}, tmp_path / "my_guidance.pt")
    trained_state = guidance_model.state_dict()

    # Step 5: load the trained model (weights only: no pickle) and sample with it.
    guidance_model = create_mlp_guidance_model()
    checkpoint = torch.load(tmp_path / "my_guidance.pt", weights_only=True)
    guidance_model.load_state_dict(checkpoint["model_state_dict"])
    guidance_model.eval()
    for name, tensor in guidance_model.state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name

    flux_model = tiny_flux_dev_interface()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 64, generator=g)  # a 64x64 image: 4x4 tokens of 64 channels
    img = noise
    img_ids, txt_ids = make_img_ids(4, 4), make_txt_ids(8)
    txt_embeddings, vec_embeddings = torch.randn(1, 8, 4096, generator=g), torch.randn(1, 768, generator=g)
    timesteps = get_schedule(num_steps=28, image_seq_len=img.shape[1])
    latents = denoise(
        model=flux_model,
        img=noise,
        img_ids=img_ids,
        txt=txt_embeddings,
        txt_ids=txt_ids,
        vec=vec_embeddings,
        timesteps=timesteps,
        guidance=3.5,
        guidance_model=guidance_model,
        guidance_scale=1.0,
        guidance_requires_grad=False,
    )
    base = denoise(
        flux_model, noise, img_ids, txt_embeddings, txt_ids, vec_embeddings, timesteps, guidance=3.5
    )
    assert latents.shape == noise.shape and torch.isfinite(latents).all()
    assert not torch.equal(latents, base)  # the loaded weights are in use

    # Use cases 3 and 4, and multi-objective guidance: build, save and load each model's weights.
    conv = ConvGuidanceModel(
        in_channels=16,
        hidden_channels=256,
        num_blocks=3,
    )
    attention = AttentionGuidanceModel(
        hidden_dim=1024,
        num_heads=8,
        num_layers=2,
    )
    combined = MultiObjectiveGuidance([conv, attention], weights=[1.0, 0.5])
    short = timesteps[:3]
    ref = denoise(flux_model, noise, img_ids, txt_embeddings, txt_ids, vec_embeddings, short, guidance=3.5)
    for built in (conv, attention, combined):
        path = tmp_path / f"{type(built).__name__}.pt"
        torch.save({"model_state_dict": built.state_dict()}, path)
        fresh = build_guidance_model(built.config)  # the same constructor arguments, from the stored config
        fresh.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
        # New (zero-output) models leave Flux-dev-shaped sampling unchanged, bit for bit.
        out = denoise(
            flux_model,
            noise,
            img_ids,
            txt_embeddings,
            txt_ids,
            vec_embeddings,
            short,
            3.5,
            guidance_model=fresh,
        )
        assert torch.equal(out, ref)
