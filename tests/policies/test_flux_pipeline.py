"""A guidance network inside diffusers' ``FluxPipeline`` (:func:`guide_pipeline`) samples what fluxguide's own
guided sampler samples, on a tiny random pipeline: same components, same noise, same schedule.

The pipe's default sigmas are fluxguide's Flux schedule (``FluxBackbone.schedule``, checked against the scheduler
in tests/backbones/test_flux_backbone.py) up to one float32 ulp: the scheduler shifts the times in float64, fluxguide
in float32. Given the pipe's own sigmas, fluxguide's sampler takes the very same steps, and the two agree bit for bit
(up to 1e-6 here); with its own schedule, to 1e-4 (a random policy is steep in ``t``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from fluxguide.backbones.flux import FluxBackbone
from fluxguide.backbones.tiny_flux import tiny_flux_components
from fluxguide.policies import AffineGuidance, BaseGuidanceModel, save_guidance_model
from fluxguide.policies.flux_pipeline import GuidedFluxTransformer, guide_pipeline, unguide_pipeline
from fluxguide.policies.registry import build_policy
from fluxguide.sampling import denoise

HEIGHT, WIDTH = 32, 48  # a 2 x 3 token grid: not square, so the policy's grid must come from the backbone
MAX_LEN = 16
STEPS = 4
PROMPTS = ["a red circle on the left of a blue square", "an astronaut riding a horse"]
SCALES = [1.0, 0.5, 2.0, 1.5]  # one per step: a step counted wrongly picks another scale


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    pipe = FluxPipeline(**tiny_flux_components(seed=3))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe_backbone(pipe: FluxPipeline) -> FluxBackbone:
    return FluxBackbone.from_pipeline(pipe, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_LEN)


@pytest.fixture(scope="module")
def pipe_policy(pipe_backbone: FluxBackbone) -> BaseGuidanceModel:
    """A text-aware attention network with every parameter random (its output layer starts at zero otherwise), so
    the correction depends on img, pred, txt, vec, t and the token positions."""
    torch.manual_seed(0)
    policy = build_policy("attention", pipe_backbone, hidden_dim=16, num_layers=1, num_heads=2).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return policy


def noise_for(pipe_backbone: FluxBackbone, seed: int) -> torch.Tensor:
    return pipe_backbone.noise(len(PROMPTS), torch.Generator().manual_seed(seed))


def pipe_sigmas(pipe: FluxPipeline, noise: torch.Tensor) -> list[float]:
    """The ``STEPS + 1`` times the pipe's scheduler steps through for these latents (set by a pipe call)."""
    pipe_output(pipe, noise)
    return pipe.scheduler.sigmas.tolist()


def fluxguide_latents(pipe_backbone: FluxBackbone, noise: torch.Tensor, pipe_policy: BaseGuidanceModel | None,
                      guidance_scale: object, timesteps: list[float]) -> torch.Tensor:
    """What ``Backbone.sample`` (the evaluation's sampler) denoises, before decoding, on ``timesteps``."""
    cond = pipe_backbone.encode(PROMPTS)
    return denoise(pipe_backbone, noise.clone(), cond.img_ids, cond.txt, cond.txt_ids, cond.vec, timesteps,
                   guidance=pipe_backbone.default_guidance, guidance_model=pipe_policy, guidance_scale=guidance_scale)


def pipe_output(pipe: FluxPipeline, noise: torch.Tensor, output_type: str = "latent", **kwargs: object) -> torch.Tensor:
    return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
                latents=noise.clone(), output_type=output_type, **kwargs).images


def test_guided_pipe_samples_what_fluxguide_samples(
    pipe: FluxPipeline, pipe_backbone: FluxBackbone, pipe_policy: BaseGuidanceModel
) -> None:
    noise = noise_for(pipe_backbone, 0)
    sigmas = pipe_sigmas(pipe, noise)
    assert sigmas == pytest.approx(pipe_backbone.schedule(STEPS), abs=1e-7)
    ours = fluxguide_latents(pipe_backbone, noise, pipe_policy, SCALES, sigmas)
    base = fluxguide_latents(pipe_backbone, noise, None, 1.0, sigmas)
    assert (ours - base).abs().max() > 0.05  # the policy really moves the sample

    guide_pipeline(pipe, pipe_policy, guidance_scale=SCALES)
    try:
        theirs = pipe_output(pipe, noise)
        again = pipe_output(pipe, noise)  # the step count starts over at every pipe call
        images = pipe_output(pipe, noise, output_type="pt")
    finally:
        unguide_pipeline(pipe)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(images, pipe_backbone.decode(ours), rtol=0, atol=1e-6)
    # Backbone.sample, on fluxguide's own schedule (one ulp off the scheduler's).
    sampled = pipe_backbone.sample(PROMPTS, num_steps=STEPS, noise=noise, guidance_model=pipe_policy, guidance_scale=SCALES)
    torch.testing.assert_close(images, sampled, rtol=0, atol=1e-4)

    # Undone: the plain transformer is back and samples the base sampler again.
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.config.transformer == ("diffusers", "FluxTransformer2DModel")
    torch.testing.assert_close(pipe_output(pipe, noise), base, rtol=0, atol=1e-6)


def test_policy_loaded_from_its_file(
    pipe: FluxPipeline, pipe_backbone: FluxBackbone, pipe_policy: BaseGuidanceModel, tmp_path: Path
) -> None:
    path = save_guidance_model(pipe_policy, tmp_path / "guidance.safetensors")
    noise = noise_for(pipe_backbone, 1)
    guide_pipeline(pipe, path, guidance_scale=0.7)
    try:
        assert isinstance(pipe.transformer, GuidedFluxTransformer)
        assert not pipe.transformer.policy.training
        theirs = pipe_output(pipe, noise)
    finally:
        unguide_pipeline(pipe)
    ours = fluxguide_latents(pipe_backbone, noise, pipe_policy, 0.7, pipe.scheduler.sigmas.tolist())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_zero_policy_is_the_unguided_pipe_bit_for_bit(pipe: FluxPipeline, pipe_backbone: FluxBackbone) -> None:
    noise = noise_for(pipe_backbone, 2)
    plain = pipe_output(pipe, noise)
    zero = build_policy("attention", pipe_backbone, hidden_dim=16, num_layers=1, num_heads=2)  # output layer at zero
    guide_pipeline(pipe, zero, guidance_scale=3.0)
    try:
        guided = pipe_output(pipe, noise)
    finally:
        unguide_pipeline(pipe)
    assert torch.equal(guided, plain)


def test_bfloat16_pipe_with_a_float32_policy(pipe_backbone: FluxBackbone, pipe_policy: BaseGuidanceModel) -> None:
    """The GPU setting: the pipe's latents and velocities stay bfloat16, the policy computes in float32."""
    pipe = FluxPipeline(**tiny_flux_components(seed=3))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=torch.bfloat16)
    noise = noise_for(pipe_backbone, 4).to(torch.bfloat16)
    plain = pipe_output(pipe, noise)
    guided = pipe_output(guide_pipeline(pipe, pipe_policy), noise)
    assert guided.dtype == torch.bfloat16 and (guided.float() - plain.float()).abs().max() > 0.05
    assert {p.dtype for p in pipe_policy.parameters()} == {torch.float32}


def test_unsupported_settings_are_refused(pipe: FluxPipeline, pipe_backbone: FluxBackbone,
                                          pipe_policy: BaseGuidanceModel) -> None:
    noise = noise_for(pipe_backbone, 3)
    guide_pipeline(pipe, pipe_policy)
    try:
        with pytest.raises(NotImplementedError, match="true_cfg_scale=1.0"):
            pipe_output(pipe, noise, negative_prompt=["blurry"] * len(PROMPTS), true_cfg_scale=2.0)
        with pytest.raises(ValueError, match="already guided"):
            guide_pipeline(pipe, pipe_policy)
    finally:
        unguide_pipeline(pipe)
    guide_pipeline(pipe, pipe_policy, guidance_scale=[1.0, 2.0])  # a scale per step, for 2 steps, on a 4-step call
    try:
        with pytest.raises(ValueError, match="got 2 for 4 steps"):
            pipe_output(pipe, noise)
    finally:
        unguide_pipeline(pipe)
    with pytest.raises(ValueError, match="not guided"):
        unguide_pipeline(pipe)

    other_size = AffineGuidance(latent_channels=48, channels=3)  # the shapes world's latents
    with pytest.raises(ValueError, match=f"latent_channels=48.*gives {pipe_backbone.latent_channels}"):
        guide_pipeline(pipe, other_size)
    with pytest.raises(TypeError, match="FluxImg2ImgPipeline"):
        guide_pipeline(FluxImg2ImgPipeline(**tiny_flux_components()), pipe_policy)
    with pytest.raises(TypeError, match="pass a number"):
        guide_pipeline(pipe, pipe_policy, guidance_scale="2")  # type: ignore[arg-type]
    assert not isinstance(pipe.transformer, GuidedFluxTransformer)  # a refusal leaves the pipe as it was
