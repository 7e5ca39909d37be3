"""``FluxBackbone``: a tiny random diffusers Flux pipeline saved to disk, loaded, and sampled.

The pipeline is built in code (``fluxguide.backbones.tiny_flux``) and written with ``save_pretrained``;
nothing is downloaded. The reference for the time / guidance convention is diffusers' own ``FluxPipeline``
run on the same components and the same initial latents.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn

from fluxguide.backbones.base import Conditioning
from fluxguide.backbones.flux import FluxBackbone
from fluxguide.backbones.flux_source import REQUIRED_SUBFOLDERS
from fluxguide.backbones.tiny_flux import tiny_flux_components, tiny_vae
from fluxguide.sampling import denoise
from fluxguide.sampling.packing import make_img_ids

HEIGHT, WIDTH = 32, 48  # latent grid 4 x 6 -> 2 x 3 = 6 tokens of 4 * 4 = 16 channels
MAX_LEN = 16
STEPS = 3
PROMPTS = ["a red circle on the left of a blue square", "An astronaut riding a horse, 4K!"]


class TokenGuidance(nn.Module):
    """A small guidance network with the seed's signature ``(img, pred, txt, vec, timestep, step_idx)``.

    Per token it sees the latent, the prediction, the time and the pooled text; the output layer starts at
    zero (docs/design.md: an untrained policy reproduces the base sampler) unless ``zero_init=False``.
    """

    def __init__(self, channels: int, vec_dim: int, hidden: int = 32, zero_init: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(2 * channels + 1, hidden)
        self.cond = nn.Linear(vec_dim, hidden)
        self.out = nn.Linear(hidden, channels)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int,
    ) -> torch.Tensor:
        t = timestep[:, None, None].expand(-1, img.shape[1], 1)
        h = torch.tanh(self.inp(torch.cat([img, pred, t], dim=-1)) + self.cond(vec)[:, None])
        return self.out(h)


@pytest.fixture(scope="module")
def flux_backbone(flux_folder: Path) -> FluxBackbone:
    return FluxBackbone.from_pretrained(flux_folder, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_LEN)


def sample_latents(
    backbone: FluxBackbone, cond: Conditioning, noise: torch.Tensor, **guidance_kwargs: object
) -> torch.Tensor:
    return denoise(
        backbone,
        noise,
        cond.img_ids,
        cond.txt,
        cond.txt_ids,
        cond.vec,
        backbone.schedule(STEPS),
        guidance=backbone.default_guidance,
        **guidance_kwargs,
    )


def pipeline_latents_and_images(
    pipe: FluxPipeline, noise: torch.Tensor, guidance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    pipe.set_progress_bar_config(disable=True)
    kwargs = {
        "prompt": PROMPTS,
        "height": HEIGHT,
        "width": WIDTH,
        "num_inference_steps": STEPS,
        "guidance_scale": guidance,
        "max_sequence_length": MAX_LEN,
    }
    latents = pipe(**kwargs, latents=noise.clone(), output_type="latent").images
    images = pipe(**kwargs, latents=noise.clone(), output_type="pt").images
    return latents, images


# ------------------------------------------------------------------------------ the tiny pipeline


def test_tiny_tokenizers_work_offline() -> None:
    components = tiny_flux_components()
    clip, t5 = components["tokenizer"], components["tokenizer_2"]
    prompt = PROMPTS[1]

    clip_ids = clip(prompt).input_ids
    assert clip_ids[0] == clip.bos_token_id and clip_ids[-1] == clip.eos_token_id
    assert clip.eos_token_id not in clip_ids[1:-1]  # no unknown pieces (CLIP's unk is <|endoftext|>)
    assert len(clip_ids) < len(prompt)  # learned merges, not one token per character
    assert clip.decode(clip_ids, skip_special_tokens=True).replace(" ", "") == prompt.lower().replace(" ", "")

    t5_ids = t5(prompt).input_ids
    assert t5_ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert t5.unk_token_id not in t5_ids
    assert t5.decode(t5_ids, skip_special_tokens=True) == prompt
    padded = t5([prompt, "a cat"], padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    assert [len(row) for row in padded] == [MAX_LEN, MAX_LEN]


def test_saved_folder_has_the_flux_pipeline_layout(flux_folder: Path) -> None:
    assert (flux_folder / "model_index.json").is_file()
    for name in (*REQUIRED_SUBFOLDERS, "scheduler"):
        assert (flux_folder / name).is_dir(), name
    assert list((flux_folder / "transformer").glob("*.safetensors"))


# ------------------------------------------------------------------------------ the backbone contract


def test_from_pretrained_geometry_and_conditioning(flux_backbone: FluxBackbone) -> None:
    assert flux_backbone.latent_shape == ((HEIGHT // 16) * (WIDTH // 16), 16)
    assert (flux_backbone.image_height, flux_backbone.image_width) == (HEIGHT, WIDTH)
    assert flux_backbone.default_guidance == 3.5 and flux_backbone.default_num_steps == 28
    assert not any(p.requires_grad for p in flux_backbone.parameters())

    cond = flux_backbone.encode(PROMPTS)
    assert cond.txt.shape == (2, MAX_LEN, 32) and cond.txt.dtype == torch.float32
    assert cond.vec.shape == (2, 32) and cond.vec.dtype == torch.float32
    assert torch.equal(cond.txt_ids, torch.zeros(MAX_LEN, 3))
    assert torch.equal(cond.img_ids, make_img_ids(HEIGHT // 16, WIDTH // 16))
    assert cond.prompts == PROMPTS
    # Different prompts, different features; the same prompt twice, the same features.
    assert (cond.txt[0] - cond.txt[1]).abs().max() > 1e-3 and (cond.vec[0] - cond.vec[1]).abs().max() > 1e-3
    again = flux_backbone.encode(PROMPTS[0])
    assert torch.equal(again.txt[0], cond.txt[0]) and torch.equal(again.vec[0], cond.vec[0])


def test_prompts_to_images_with_a_guidance_model(flux_backbone: FluxBackbone) -> None:
    cond = flux_backbone.encode(PROMPTS)
    noise = flux_backbone.noise(2, torch.Generator().manual_seed(0))
    assert noise.dtype == torch.float32 and noise.shape == (2, *flux_backbone.latent_shape)

    base = sample_latents(flux_backbone, cond, noise)
    torch.manual_seed(1)
    zero = TokenGuidance(flux_backbone.latent_channels, cond.vec.shape[1])
    with_zero = sample_latents(flux_backbone, cond, noise, guidance_model=zero)
    assert torch.equal(with_zero, base)  # a zero-initialised policy is the base sampler, bit for bit

    images = flux_backbone.decode(with_zero)
    assert images.shape == (2, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01

    torch.manual_seed(2)
    active = TokenGuidance(flux_backbone.latent_channels, cond.vec.shape[1], zero_init=False)
    guided = sample_latents(flux_backbone, cond, noise, guidance_model=active, guidance_scale=2.0)
    assert (guided - base).abs().max() > 1e-2
    assert (flux_backbone.decode(guided) - images).abs().max() > 1e-3
    unscaled = sample_latents(flux_backbone, cond, noise, guidance_model=active, guidance_scale=0.0)
    assert torch.equal(unscaled, base)

    # Backbone.sample runs the same loop end to end.
    sampled = flux_backbone.sample(
        PROMPTS, num_steps=STEPS, noise=noise, guidance_model=active, guidance_scale=2.0
    )
    torch.testing.assert_close(sampled, flux_backbone.decode(guided), rtol=0, atol=1e-6)


def test_matches_diffusers_flux_pipeline(flux_folder: Path, flux_backbone: FluxBackbone) -> None:
    """Same components, same noise: our denoise with no guidance model is diffusers' FluxPipeline."""
    noise = flux_backbone.noise(2, torch.Generator().manual_seed(3))
    ours = sample_latents(flux_backbone, flux_backbone.encode(PROMPTS), noise)
    pipe = FluxPipeline.from_pretrained(flux_folder)
    theirs, their_images = pipeline_latents_and_images(pipe, noise, guidance=3.5)
    assert (ours - noise).abs().max() > 0.1  # the comparison is not between two copies of the noise
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(flux_backbone.decode(ours), their_images, rtol=0, atol=1e-5)
    # A different distilled guidance strength changes the result, so the guidance really is compared.
    other, _ = pipeline_latents_and_images(pipe, noise, guidance=1.0)
    assert (other - theirs).abs().max() > 1e-4


def test_matches_diffusers_without_guidance_embedding() -> None:
    """FLUX.1-schnell-like: no guidance embedding, unshifted schedule; built from a live pipeline."""
    pipe = FluxPipeline(**tiny_flux_components(guidance_embeds=False, seed=5))
    backbone = FluxBackbone.from_pipeline(pipe, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_LEN)
    assert backbone.default_guidance is None and not backbone.schedule_shift
    assert backbone.schedule(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-7)
    noise = backbone.noise(2, torch.Generator().manual_seed(4))
    ours = sample_latents(backbone, backbone.encode(PROMPTS), noise)
    theirs, their_images = pipeline_latents_and_images(pipe, noise, guidance=3.5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(backbone.decode(ours), their_images, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
        {"use_dynamic_shifting": True, "base_shift": 0.3, "max_shift": 2.0, "max_image_seq_len": 1024},
        {"use_dynamic_shifting": False, "shift": 3.0},
        {"use_dynamic_shifting": False, "shift": 1.0},
    ],
)
def test_schedule_is_the_schedulers_sigmas(config: dict[str, object]) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    components = tiny_flux_components()
    del components["scheduler"]
    backbone = FluxBackbone(**components, height=64, width=96, scheduler_config=scheduler.config)
    n = 7
    mu = None
    if scheduler.config.use_dynamic_shifting:
        cfg = scheduler.config
        mu = calculate_shift(
            backbone.latent_seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert backbone.schedule(n) == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6)


def test_forward_and_decode_are_differentiable(flux_backbone: FluxBackbone) -> None:
    cond = flux_backbone.encode(PROMPTS[:1])
    img = flux_backbone.noise(1, torch.Generator().manual_seed(5)).requires_grad_(True)
    pred = flux_backbone.velocity(img, 0.7, cond)
    images = flux_backbone.decode(img - 0.7 * pred)  # the one-step x0 estimate, decoded
    images.mean().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_batched_ids_as_bfl_makes_them(flux_backbone: FluxBackbone) -> None:
    """BFL's ``prepare`` gives ids of shape (B, L, 3); the backbone accepts them as well as (L, 3)."""
    cond = flux_backbone.encode(PROMPTS)
    img = flux_backbone.noise(2, torch.Generator().manual_seed(8))
    t, g = torch.full((2,), 0.6), torch.full((2,), 3.5)
    flat = flux_backbone(img, cond.img_ids, cond.txt, cond.txt_ids, t, cond.vec, g)
    batched = flux_backbone(
        img, cond.img_ids.expand(2, -1, -1), cond.txt, cond.txt_ids.expand(2, -1, -1), t, cond.vec, g
    )
    assert flat.dtype == torch.float32 and torch.equal(flat, batched)


def test_encode_images_inverts_the_packing(flux_backbone: FluxBackbone) -> None:
    images = flux_backbone.decode(flux_backbone.noise(2, torch.Generator().manual_seed(6)))
    latents = flux_backbone.encode_images(images)
    assert latents.shape == (2, *flux_backbone.latent_shape) and latents.dtype == torch.float32
    # Against the VAE used directly: pack(scale * (mode - shift)).
    vae = flux_backbone.vae
    mode = vae.encode(images * 2 - 1).latent_dist.mode()
    direct = FluxPipeline._pack_latents(
        (mode - vae.config.shift_factor) * vae.config.scaling_factor, 2, 4, HEIGHT // 8, WIDTH // 8
    )
    torch.testing.assert_close(latents, direct)


def test_bfloat16_model_keeps_float32_sampler_math(flux_folder: Path) -> None:
    backbone = FluxBackbone.from_pretrained(
        flux_folder, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_LEN, dtype=torch.bfloat16
    )
    assert backbone.transformer.dtype == torch.bfloat16 and backbone.vae.dtype == torch.bfloat16
    cond = backbone.encode(PROMPTS)
    assert cond.txt.dtype == torch.float32
    noise = backbone.noise(2, torch.Generator().manual_seed(7))
    latents = sample_latents(backbone, cond, noise)
    assert noise.dtype == latents.dtype == torch.float32
    images = backbone.decode(latents)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("height", "width"), [(40, 48), (32, 50), (0, 48)])
def test_bad_image_size_is_refused(flux_folder: Path, height: int, width: int) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        FluxBackbone.from_pretrained(flux_folder, height=height, width=width)


def test_missing_subfolder_is_named(flux_folder: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(flux_folder, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="missing the subfolder\\(s\\) tokenizer_2, vae"):
        FluxBackbone.from_pretrained(broken, height=HEIGHT, width=WIDTH)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FluxBackbone.from_pretrained(tmp_path / "nowhere", height=HEIGHT, width=WIDTH)


def test_bad_calls_are_refused(flux_backbone: FluxBackbone) -> None:
    cond = flux_backbone.encode(PROMPTS[:1])
    img = flux_backbone.noise(1)
    t = torch.ones(1)
    with pytest.raises(ValueError, match="guidance-distilled"):
        flux_backbone(img=img, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.vec)
    with pytest.raises(ValueError, match="packed latents"):
        flux_backbone.decode(img[:, :-1])
    with pytest.raises(ValueError, match="prompt strings"):
        flux_backbone.encode([])
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxBackbone.from_pipeline(
            FluxPipeline(**tiny_flux_components()), height=32, width=32, max_sequence_length=513
        )


def test_mismatched_components_are_refused() -> None:
    components = tiny_flux_components()
    del components["scheduler"]
    components["vae"] = tiny_vae(latent_channels=2)
    with pytest.raises(ValueError, match="in_channels=16 but the VAE has 2 latent channels"):
        FluxBackbone(**components, height=32, width=32)
