"""The guidance architectures: shapes, zero start, conditioning, position awareness, errors, Flux scale."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fluxguide.policies import (
    AttentionGuidanceModel,
    BaseGuidanceModel,
    ConvGuidanceModel,
    MLPGuidanceModel,
    build_guidance_model,
    load_guidance_model,
    save_guidance_model,
)

ARCHS = ("mlp", "attention", "conv")


def call(model, obs, step=4):
    return model(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], step)


@pytest.mark.parametrize("arch", ARCHS)
def test_new_model_outputs_exact_zeros_shaped_like_pred(arch, world, make_guidance, make_observation):
    model = make_guidance(arch, world)
    assert isinstance(model, BaseGuidanceModel)
    obs = make_observation(world)
    out = call(model, obs)
    assert out.shape == obs["pred"].shape and out.dtype == obs["pred"].dtype
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_model_is_finite_and_differentiable(arch, world, make_guidance, make_observation, perturb):
    model = perturb(make_guidance(arch, world))
    obs = make_observation(world)
    obs["img"].requires_grad_(True)
    out = call(model, obs)
    assert out.shape == obs["pred"].shape
    assert torch.isfinite(out).all() and out.abs().max() > 1e-3
    out.square().sum().backward()
    assert torch.isfinite(obs["img"].grad).all() and obs["img"].grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_model_output_layer_gets_gradient(arch, world, make_guidance, make_observation):
    """Zero init must not block learning: at step 0 the output layer's weight gets a nonzero gradient."""
    model = make_guidance(arch, world)
    obs = make_observation(world)
    (call(model, obs) * obs["pred"]).sum().backward()
    assert model.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_output_depends_on_timestep(arch, world, make_guidance, make_observation, perturb):
    model = perturb(make_guidance(arch, world))
    obs = make_observation(world)
    early = model(obs["img"], obs["pred"], obs["txt"], obs["vec"], torch.full((3,), 0.9), 0)
    late = model(obs["img"], obs["pred"], obs["txt"], obs["vec"], torch.full((3,), 0.1), 0)
    assert (early - late).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_guidance_knows_token_positions(arch, world, make_guidance, perturb):
    """Identical token contents at every position still give position-dependent corrections."""
    model = perturb(make_guidance(arch, world))
    g = torch.Generator().manual_seed(3)
    if arch == "conv":
        # The conv model sees pixels; make every pixel of every channel identical instead of every token.
        img = torch.randn(1, 1, world.in_channels, generator=g).repeat_interleave(world.patch**2, dim=-1)
        pred = torch.randn(1, 1, world.in_channels, generator=g).repeat_interleave(world.patch**2, dim=-1)
    else:
        img = torch.randn(1, 1, world.channels, generator=g)
        pred = torch.randn(1, 1, world.channels, generator=g)
    img, pred = img.expand(1, world.seq, -1).contiguous(), pred.expand(1, world.seq, -1).contiguous()
    out = model(
        img,
        pred,
        torch.randn(1, world.txt_len, world.txt_dim),
        torch.randn(1, world.vec_dim),
        torch.tensor([0.5]),
        0,
    )
    spread = (out - out.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2))
    assert spread.item() > 1e-3


def test_only_attention_reads_txt(world, make_guidance, make_observation, perturb):
    obs = make_observation(world)
    other_txt = torch.randn_like(obs["txt"])
    for arch in ARCHS:
        model = perturb(make_guidance(arch, world))
        a = call(model, obs)
        b = model(obs["img"], obs["pred"], other_txt, obs["vec"], obs["t"], 4)
        if arch == "attention":
            assert (a - b).abs().max() > 1e-4
        else:
            assert torch.equal(a, b)


def test_text_blind_attention_ignores_the_prompt_but_not_the_state(world, make_observation, perturb, tmp_path):
    """A text-blind student sees img, pred and t only: another txt / vec leaves its output unchanged."""
    model = perturb(AttentionGuidanceModel(hidden_dim=32, num_heads=4, num_layers=2, latent_channels=world.channels,
                                           txt_dim=world.txt_dim, vec_dim=world.vec_dim, text_conditioning=False))
    obs = make_observation(world)
    a = call(model, obs)
    b = model(obs["img"], obs["pred"], torch.randn_like(obs["txt"]), torch.randn_like(obs["vec"]), obs["t"], 4)
    assert torch.equal(a, b)
    c = model(obs["img"], obs["pred"] + 0.5, obs["txt"], obs["vec"], obs["t"], 4)
    assert (a - c).abs().max() > 1e-4
    assert not any("txt_in" in n or "cross" in n or "vec_proj" in n for n, _ in model.named_parameters())
    save_guidance_model(model, tmp_path / "blind.safetensors")
    loaded = load_guidance_model(tmp_path / "blind.safetensors")
    assert loaded.config["text_conditioning"] is False
    assert torch.equal(call(loaded, obs), a)


def test_timestep_forms_agree(make_guidance, make_observation, perturb, world):
    model = perturb(make_guidance("mlp", world))
    obs = make_observation(world)
    t = torch.full((3,), 0.3)
    ref = model(obs["img"], obs["pred"], obs["txt"], obs["vec"], t, 0)
    for form in (0.3, torch.tensor(0.3), t[:, None], torch.tensor([0.3])):
        torch.testing.assert_close(model(obs["img"], obs["pred"], obs["txt"], obs["vec"], form, 0), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_mismatched_channels_name_expected_and_actual(
    arch, make_guidance, make_observation, shapes_world, flux_world
):
    model = make_guidance(arch, shapes_world)  # expects 48 channels
    obs = make_observation(flux_world)  # has 64
    with pytest.raises(ValueError, match=r"expects latents \(B, seq, 48\).*got img of shape \(3, 16, 64\)"):
        call(model, obs)


@pytest.mark.parametrize("arch", ARCHS)
def test_mismatched_seq_names_expected_and_actual(arch, make_observation, shapes_world):
    sizes = {
        "mlp": {"latent_channels": 48, "hidden_dim": 16, "vec_dim": 64},
        "attention": {"hidden_dim": 16, "num_heads": 2, "latent_channels": 48, "txt_dim": 64, "vec_dim": 64},
        "conv": {"in_channels": 3, "hidden_channels": 8, "patch_size": 4, "vec_dim": 64},
    }[arch]
    cls = {"mlp": MLPGuidanceModel, "attention": AttentionGuidanceModel, "conv": ConvGuidanceModel}[arch]
    model = cls(grid_size=8, **sizes)
    small = dataclasses.replace(shapes_world, grid=4)
    with pytest.raises(ValueError, match=r"expects seq 64 \(8x8 token grid.*got seq 16"):
        call(model, make_observation(small))
    # Without grid_size the grid is inferred, and a non-square sequence is refused with the fix.
    free = cls(**sizes)
    obs = make_observation(shapes_world)
    obs = {k: (v[:, :48] if k in ("img", "pred") else v) for k, v in obs.items()}
    with pytest.raises(ValueError, match=r"seq 48 is not a square token grid; pass grid_size"):
        call(free, obs)


def test_mismatched_text_widths_are_reported(make_observation, shapes_world):
    obs = make_observation(shapes_world)
    attention = AttentionGuidanceModel(
        hidden_dim=16, num_heads=2, latent_channels=48, txt_dim=4096, vec_dim=64
    )
    with pytest.raises(ValueError, match=r"expects txt of shape \(B, L, 4096\).*got \(3, 8, 64\)"):
        call(attention, obs)
    mlp = MLPGuidanceModel(latent_channels=48, hidden_dim=16, vec_dim=768)
    with pytest.raises(ValueError, match=r"expects vec of shape \(B, 768\).*got \(3, 64\)"):
        call(mlp, obs)
    with pytest.raises(ValueError, match=r"pred must be shaped like img"):
        mlp(obs["img"], obs["pred"][:, :10], obs["txt"], obs["vec"], obs["t"], 0)


@pytest.mark.parametrize("cls", [MLPGuidanceModel, ConvGuidanceModel])
def test_non_square_grid_with_grid_size(cls, make_observation, perturb, shapes_world):
    kwargs = {"latent_channels": 48} if cls is MLPGuidanceModel else {"in_channels": 3, "patch_size": 4}
    model = perturb(cls(**kwargs, vec_dim=64, grid_size=(4, 8)))
    obs = make_observation(shapes_world)  # take the first 32 tokens as a 4 x 8 grid
    out = model(obs["img"][:, :32], obs["pred"][:, :32], obs["txt"], obs["vec"], obs["t"], 0)
    assert out.shape == (3, 32, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_config_rebuilds_and_file_roundtrip(arch, world, make_guidance, make_observation, perturb, tmp_path):
    model = perturb(make_guidance(arch, world))
    rebuilt = build_guidance_model(model.config)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture
    obs = make_observation(world)
    assert torch.equal(call(rebuilt, obs), call(model, obs))
    loaded = load_guidance_model(save_guidance_model(model, tmp_path / "g.safetensors"))
    assert torch.equal(call(loaded, obs), call(model, obs))


def test_build_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown guidance model type 'Nope'"):
        build_guidance_model({"type": "Nope"})


def test_user_subclass_is_rebuildable():
    class ScaledPred(BaseGuidanceModel):
        def __init__(self, gain: float = 0.5) -> None:
            super().__init__()
            self.register_config(gain=gain)
            self.gain = torch.nn.Parameter(torch.tensor(gain))

        def forward(self, img, pred, txt, vec, timestep, step_idx):
            self.check_inputs(img, pred, txt, vec, timestep, step_idx)
            return self.gain * pred

    model = build_guidance_model(ScaledPred(0.25).config)
    pred = torch.ones(1, 4, 2)
    out = model(pred, pred, torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.ones(1), 0)
    assert torch.equal(out, 0.25 * pred)


FLUX_1024 = {"batch": 1, "seq": 4096, "channels": 64, "txt_len": 512, "txt_dim": 4096, "vec_dim": 768}


@pytest.mark.parametrize("arch", ARCHS)
def test_flux_scale_models_build_and_run_on_meta(arch):
    """At seed defaults, for 1024x1024 Flux latents (seq 4096, 64 channels, T5 4096-d), shapes only."""
    with torch.device("meta"):
        model = {
            "mlp": lambda: MLPGuidanceModel(latent_channels=64, hidden_dim=1024, num_layers=3),
            "attention": lambda: AttentionGuidanceModel(hidden_dim=1024, num_heads=8, num_layers=2),
            "conv": lambda: ConvGuidanceModel(in_channels=16, hidden_channels=256, num_blocks=3),
        }[arch]()
        s = FLUX_1024
        img = torch.empty(s["batch"], s["seq"], s["channels"])
        out = model(
            img,
            img,
            torch.empty(1, s["txt_len"], s["txt_dim"]),
            torch.empty(1, s["vec_dim"]),
            torch.ones(1),
            0,
        )
    assert out.shape == (1, 4096, 64)
    assert sum(p.numel() for p in model.parameters()) < 100_000_000


@pytest.mark.parametrize("arch", ARCHS)
def test_low_precision_model_returns_the_prediction_dtype(arch, shapes_world, make_observation, perturb):
    """A bf16 guidance model takes float32 sampler state and hands back a float32 correction."""
    model = build_guidance_model(_small(arch).config, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    perturb(model)
    obs = make_observation(shapes_world)
    out = call(model, obs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.abs().max() > 0


def _small(arch):
    return {
        "mlp": lambda: MLPGuidanceModel(latent_channels=48, hidden_dim=16, vec_dim=64),
        "attention": lambda: AttentionGuidanceModel(16, 2, 1, latent_channels=48, txt_dim=64, vec_dim=64),
        "conv": lambda: ConvGuidanceModel(3, 8, 1, patch_size=4, vec_dim=64),
    }[arch]()
