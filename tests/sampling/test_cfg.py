"""Classifier-free guidance as a BFL-signature model around a tiny real diffusers Flux transformer."""

from __future__ import annotations

import itertools

import pytest
import torch

from fluxguide.sampling import ClassifierFreeGuidance, denoise, get_schedule
from tests.sampling import fixed_tiny_flux, make_inputs


def call_at(model: torch.nn.Module, inputs: dict[str, torch.Tensor], t: float, txt: torch.Tensor, vec: torch.Tensor,
            guidance: float | None) -> torch.Tensor:
    b = inputs["img"].shape[0]
    return model(
        img=inputs["img"], img_ids=inputs["img_ids"], txt=txt, txt_ids=inputs["txt_ids"],
        timesteps=torch.full((b,), t), y=vec, guidance=None if guidance is None else torch.full((b,), guidance),
    )


def uncond(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    e = make_inputs(batch=batch, seed=7)
    return e["txt"], e["vec"]


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_scale_one_is_the_model(guidance_embeds: bool) -> None:
    model, inputs = fixed_tiny_flux(guidance_embeds), make_inputs()
    u_txt, u_vec = uncond()
    cfg = ClassifierFreeGuidance(model, u_txt, u_vec, scale=1.0)
    g = 3.0 if guidance_embeds else None
    with torch.no_grad():
        assert torch.equal(call_at(cfg, inputs, 0.6, inputs["txt"], inputs["vec"], g),
                           call_at(model, inputs, 0.6, inputs["txt"], inputs["vec"], g))


@pytest.mark.parametrize("guidance_embeds", [True, False])
@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
@pytest.mark.parametrize("uncond_batch", [1, 2])
def test_scale_s_is_uncond_plus_s_times_difference(guidance_embeds: bool, scale: float, uncond_batch: int) -> None:
    model, inputs = fixed_tiny_flux(guidance_embeds), make_inputs()
    u_txt, u_vec = uncond(uncond_batch)
    cfg = ClassifierFreeGuidance(model, u_txt, u_vec, scale=scale)
    g = 3.0 if guidance_embeds else None
    with torch.no_grad():
        got = call_at(cfg, inputs, 0.6, inputs["txt"], inputs["vec"], g)
        cond = call_at(model, inputs, 0.6, inputs["txt"], inputs["vec"], g)
        unc = call_at(model, inputs, 0.6, u_txt.expand(2, -1, -1), u_vec.expand(2, -1), g)
    assert (cond - unc).abs().max() > 1e-3, "the prompt must change the prediction"
    # One batched call versus two separate ones: float32 rounding of either branch, amplified by the scale.
    torch.testing.assert_close(got, unc + scale * (cond - unc), rtol=1e-5, atol=1e-6 * (1 + scale))


def test_cfg_in_denoise_matches_manual_loop() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    u_txt, u_vec = uncond()
    cfg = ClassifierFreeGuidance(model, u_txt, u_vec, scale=3.0)
    ts = get_schedule(4, 16)
    got = denoise(cfg, timesteps=ts, guidance=4.0, **inputs)
    img = inputs["img"]
    with torch.no_grad():
        for t_curr, t_prev in itertools.pairwise(ts):
            step_inputs = dict(inputs, img=img)
            cond = call_at(model, step_inputs, t_curr, inputs["txt"], inputs["vec"], 4.0)
            unc = call_at(model, step_inputs, t_curr, u_txt.expand(2, -1, -1), u_vec.expand(2, -1), 4.0)
            img = img + (t_prev - t_curr) * (unc + 3.0 * (cond - unc))
    torch.testing.assert_close(got, img, rtol=1e-5, atol=1e-5)


def test_moves_with_the_module() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs(dtype=torch.float64)
    u_txt, u_vec = uncond()
    cfg = ClassifierFreeGuidance(model, u_txt, u_vec, scale=2.0).double()
    assert cfg.uncond_txt.dtype == torch.float64 and cfg.uncond_vec.dtype == torch.float64
    assert denoise(cfg, timesteps=get_schedule(2, 16), **inputs).dtype == torch.float64
    assert "uncond_txt" not in cfg.state_dict(), "the empty-prompt encoding is not a weight"


def test_mismatched_unconditional_text_raises() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    u = make_inputs(batch=1, txt_len=7)
    cfg = ClassifierFreeGuidance(model, u["txt"], u["vec"], scale=2.0)
    with pytest.raises(ValueError, match=r"unconditional txt \(1, 7, 32\) does not match txt \(2, 5, 32\)"):
        call_at(cfg, inputs, 0.5, inputs["txt"], inputs["vec"], 4.0)
