"""``BFLBackbone``: any model with the BFL ``flux`` signature plus user encode / decode callables.

The BFL-side pieces are written here the way black-forest-labs/flux shapes them: a ``Flux``-like module
called with BFL's argument names and batched ids (it concatenates ids along dim 1, so unbatched ids fail),
an ``HFEmbedder``-like text embedder, and an ``AutoEncoder``-like ``decode`` that takes spatial latents and
returns images in [-1, 1]. Inside they use the tiny random diffusers components, so the adapter's samples can
be compared with :class:`FluxBackbone` on the very same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn

from fluxguide.backbones.bfl import BFLBackbone
from fluxguide.backbones.flux import FluxBackbone
from fluxguide.backbones.tiny_flux import tiny_flux_components
from fluxguide.sampling import denoise
from tests.backbones.test_flux_backbone import TokenGuidance

HEIGHT, WIDTH = 32, 48
MAX_LEN = 16
STEPS = 3
PROMPTS = ["a green triangle above a yellow star", "a bowl of fruit"]


@dataclass
class FluxParams:
    guidance_embed: bool


class BFLSignatureFlux(nn.Module):
    """A model with BFL's ``Flux.forward`` signature and input checks around a diffusers transformer."""

    def __init__(self, transformer: FluxTransformer2DModel) -> None:
        super().__init__()
        self.transformer = transformer
        self.params = FluxParams(guidance_embed=bool(transformer.config.guidance_embeds))

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        ids = torch.cat((txt_ids, img_ids), dim=1)  # as BFL's Flux: needs batched (B, L, 3) ids
        if self.params.guidance_embed and guidance is None:
            raise ValueError("Didn't get guidance strength for guidance distilled model.")
        return self.transformer(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=timesteps,
            img_ids=ids[0, txt.shape[1] :],
            txt_ids=ids[0, : txt.shape[1]],
            guidance=guidance if self.params.guidance_embed else None,
            return_dict=False,
        )[0]


class HFEmbedderLike(nn.Module):
    """BFL's ``HFEmbedder``: prompts -> T5 last hidden state or CLIP pooled output."""

    def __init__(self, tokenizer: object, encoder: nn.Module, max_length: int, output_key: str) -> None:
        super().__init__()
        self.tokenizer, self.encoder = tokenizer, encoder
        self.max_length, self.output_key = max_length, output_key

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        ).input_ids
        return self.encoder(input_ids=ids, attention_mask=None, output_hidden_states=False)[self.output_key]


class AutoEncoderLike(nn.Module):
    """BFL's ``AutoEncoder.decode``: spatial latents -> scale / shift -> decoder -> images in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(z, return_dict=False)[0]


def make_backbones(guidance_embeds: bool = True) -> tuple[BFLBackbone, FluxBackbone]:
    """The adapter and FluxBackbone over the same tiny weights."""
    c = tiny_flux_components(guidance_embeds=guidance_embeds, seed=11)
    t5 = HFEmbedderLike(c["tokenizer_2"], c["text_encoder_2"], MAX_LEN, "last_hidden_state")
    clip = HFEmbedderLike(c["tokenizer"], c["text_encoder"], 77, "pooler_output")
    ae = AutoEncoderLike(c["vae"])
    bfl = BFLBackbone(
        BFLSignatureFlux(c["transformer"]),
        encode_fn=lambda prompts: (t5(prompts), clip(prompts)),
        decode_fn=ae.decode,
        height=HEIGHT,
        width=WIDTH,
        latent_channels=c["vae"].config.latent_channels,
        schedule_shift=guidance_embeds,  # BFL: shift for dev, none for schnell
    )
    flux = FluxBackbone(
        **{k: v for k, v in c.items() if k != "scheduler"},
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=MAX_LEN,
        scheduler_config=c["scheduler"].config,
    )
    return bfl, flux


@pytest.fixture(scope="module")
def backbones() -> tuple[BFLBackbone, FluxBackbone]:
    return make_backbones()


def test_geometry_and_conditioning(backbones: tuple[BFLBackbone, FluxBackbone]) -> None:
    bfl, flux = backbones
    assert bfl.latent_shape == flux.latent_shape == (6, 16)
    assert bfl.default_guidance == 3.5  # read from model.params.guidance_embed, as BFL's FLUX.1-dev
    cond, ref = bfl.encode(PROMPTS), flux.encode(PROMPTS)
    assert cond.txt.dtype == cond.vec.dtype == torch.float32
    for name in ("txt", "vec", "txt_ids", "img_ids"):
        torch.testing.assert_close(getattr(cond, name), getattr(ref, name), rtol=0, atol=0)


def test_adapter_samples_like_flux_backbone(backbones: tuple[BFLBackbone, FluxBackbone]) -> None:
    bfl, flux = backbones
    noise = bfl.noise(2, torch.Generator().manual_seed(0))
    assert bfl.schedule(STEPS) == flux.schedule(STEPS)
    images = bfl.sample(PROMPTS, num_steps=STEPS, noise=noise)
    assert images.shape == (2, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    reference = flux.sample(PROMPTS, num_steps=STEPS, noise=noise)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-6)


def test_adapter_with_guidance_models(backbones: tuple[BFLBackbone, FluxBackbone]) -> None:
    bfl, _ = backbones
    cond = bfl.encode(PROMPTS)
    noise = bfl.noise(2, torch.Generator().manual_seed(1))

    def run(**kwargs: object) -> torch.Tensor:
        return denoise(
            bfl, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, bfl.schedule(STEPS),
            guidance=bfl.default_guidance, **kwargs,
        )  # fmt: skip

    base = run()
    torch.manual_seed(0)
    assert torch.equal(run(guidance_model=TokenGuidance(16, cond.vec.shape[1])), base)
    torch.manual_seed(1)
    guided = run(guidance_model=TokenGuidance(16, cond.vec.shape[1], zero_init=False), guidance_scale=2.0)
    assert (guided - base).abs().max() > 1e-2
    assert (bfl.decode(guided) - bfl.decode(base)).abs().max() > 1e-3


def test_reward_gradient_flows_through_the_adapter(backbones: tuple[BFLBackbone, FluxBackbone]) -> None:
    bfl, _ = backbones
    cond = bfl.encode(PROMPTS[:1])
    torch.manual_seed(2)
    policy = TokenGuidance(16, cond.vec.shape[1], zero_init=False)
    latents = denoise(
        bfl, bfl.noise(1, torch.Generator().manual_seed(2)), cond.img_ids, cond.txt, cond.txt_ids, cond.vec,
        bfl.schedule(2), guidance=bfl.default_guidance, guidance_model=policy, guidance_requires_grad=True,
    )  # fmt: skip
    bfl.decode(latents).mean().backward()
    assert policy.out.weight.grad is not None and policy.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bfl.parameters())  # the base model stays frozen


def test_schnell_like_model_has_no_guidance() -> None:
    bfl, flux = make_backbones(guidance_embeds=False)
    assert bfl.default_guidance is None and not bfl.schedule_shift
    noise = bfl.noise(1, torch.Generator().manual_seed(3))
    images = bfl.sample(PROMPTS[:1], num_steps=2, noise=noise)
    torch.testing.assert_close(images, flux.sample(PROMPTS[:1], num_steps=2, noise=noise), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_are_refused(backbones: tuple[BFLBackbone, FluxBackbone]) -> None:
    bfl, _ = backbones
    model, encode_fn, decode_fn = bfl.model, bfl.encode_fn, bfl.decode_fn
    with pytest.raises(ValueError, match="width=40 must be a positive multiple of 16"):
        BFLBackbone(model, encode_fn, decode_fn, height=32, width=40, latent_channels=4)
    with pytest.raises(TypeError, match="nn.Module"):
        BFLBackbone(lambda **kw: kw["img"], encode_fn, decode_fn, height=32, width=32)

    bad_encode = BFLBackbone(
        model,
        lambda p: (torch.zeros(1, 4, 32), torch.zeros(1, 32)),
        decode_fn,
        height=32,
        width=48,
        latent_channels=4,
    )
    with pytest.raises(ValueError, match="B=2 prompts"):
        bad_encode.encode(PROMPTS)

    bad_decode = BFLBackbone(
        model, encode_fn, lambda z: z[:, :3], height=32, width=48, latent_channels=4, guidance=3.5
    )
    with pytest.raises(ValueError, match="expected images of shape"):
        bad_decode.decode(bad_decode.noise(1))
    with pytest.raises(ValueError, match="packed latents"):
        bfl.decode(torch.zeros(1, 5, 16))
