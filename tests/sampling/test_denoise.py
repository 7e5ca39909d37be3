"""``denoise``: the guided Euler loop, its differentiable mode and its input checks.

The base model is a tiny real diffusers ``FluxTransformer2DModel`` behind the BFL signature
(``tests/sampling/__init__.py``); the references are plain loops written out here.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from fluxguide.sampling import denoise, get_schedule
from tests.sampling import BFLFlux, TokenMLPGuidance, fixed_tiny_flux, make_inputs

STEPS = 4


def plain_euler(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    timesteps: list[float],
    guidance: float | None,
    correction: nn.Module | None = None,
    scales: list[float] | None = None,
) -> torch.Tensor:
    """BFL's Euler loop, with ``pred + scales[i] * correction(...)`` when a correction is given."""
    img, txt, vec = inputs["img"], inputs["txt"], inputs["vec"]
    b = img.shape[0]
    g = None if guidance is None else torch.full((b,), guidance, dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(itertools.pairwise(timesteps)):
        t_vec = torch.full((b,), t_curr, dtype=img.dtype)
        pred = model(
            img=img, img_ids=inputs["img_ids"], txt=txt, txt_ids=inputs["txt_ids"], y=vec, timesteps=t_vec, guidance=g
        )
        if correction is not None:
            assert scales is not None
            pred = pred + scales[i] * correction(img, pred, txt, vec, t_vec, i)
        img = img + (t_prev - t_curr) * pred
    return img


def random_guidance(seed: int = 0, dtype: torch.dtype = torch.float32) -> TokenMLPGuidance:
    """A guidance model whose correction is not zero (a trained one)."""
    torch.manual_seed(seed)
    model = TokenMLPGuidance(zero_init=False).to(dtype)
    with torch.no_grad():
        model.net[-1].weight.mul_(0.5)
    return model


# ---------------------------------------------------------------- the base sampler, bit for bit


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_no_guidance_model_is_plain_euler(guidance_embeds: bool) -> None:
    model, inputs = fixed_tiny_flux(guidance_embeds), make_inputs()
    ts = get_schedule(STEPS, inputs["img"].shape[1])
    guidance = 3.5 if guidance_embeds else None
    with torch.no_grad():
        want = plain_euler(model, inputs, ts, guidance)
    got = denoise(model, timesteps=ts, guidance=guidance, **inputs)
    assert torch.equal(got, want)
    assert not torch.equal(got, inputs["img"])


@pytest.mark.parametrize("guidance_embeds", [True, False])
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5, [0.0, 2.0, 1.0, 5.0]])
def test_fresh_guidance_model_is_plain_euler(guidance_embeds: bool, guidance_scale: float | list[float]) -> None:
    model, inputs = fixed_tiny_flux(guidance_embeds), make_inputs()
    ts = get_schedule(STEPS, inputs["img"].shape[1])
    guidance = 4.0 if guidance_embeds else None
    with torch.no_grad():
        want = plain_euler(model, inputs, ts, guidance)
    fresh = TokenMLPGuidance()
    got = denoise(model, timesteps=ts, guidance=guidance, guidance_model=fresh, guidance_scale=guidance_scale, **inputs)
    assert torch.equal(got, want)
    # The differentiable loop (checkpointed or not) computes the same forward values.
    for ckpt in (True, False):
        got = denoise(
            model, timesteps=ts, guidance=guidance, guidance_model=fresh, guidance_scale=guidance_scale,
            guidance_requires_grad=True, gradient_checkpointing=ckpt, **inputs,
        )
        assert got.requires_grad and torch.equal(got.detach(), want)


def test_distilled_guidance_strength_reaches_the_model() -> None:
    model, inputs = fixed_tiny_flux(guidance_embeds=True), make_inputs()
    ts = get_schedule(STEPS, 16)
    assert not torch.equal(denoise(model, timesteps=ts, guidance=1.0, **inputs), denoise(model, timesteps=ts, **inputs))


# ---------------------------------------------------------------- guidance scales


def test_per_step_scales_list_and_callable() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    ts = get_schedule(STEPS, 16)
    scales = [0.0, 2.0, -1.0, 0.5]
    with torch.no_grad():
        want = plain_euler(model, inputs, ts, 4.0, guide, scales)
        constant = plain_euler(model, inputs, ts, 4.0, guide, [2.0] * STEPS)
    by_list = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=scales, **inputs)
    by_tuple = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=tuple(scales), **inputs)
    by_callable = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=lambda i: scales[i], **inputs)
    by_float = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=2.0, **inputs)
    torch.testing.assert_close(by_list, want, rtol=0, atol=1e-6)
    assert torch.equal(by_list, by_tuple) and torch.equal(by_list, by_callable)
    torch.testing.assert_close(by_float, constant, rtol=0, atol=1e-6)
    assert (by_list - by_float).abs().max() > 1e-3, "the scales must change the result"


def test_scale_given_as_numpy_or_tensor() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    ts = get_schedule(STEPS, 16)
    want = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=2.0, **inputs)
    for scale in (np.float32(2.0), torch.tensor(2.0), np.full(STEPS, 2.0), torch.full((STEPS,), 2.0)):
        assert torch.equal(denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=scale, **inputs), want)


@pytest.mark.parametrize("scales", [[1.0, 2.0, 3.0], [1.0] * (STEPS + 1), []])
def test_wrong_length_scale_list_raises(scales: list[float]) -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    with pytest.raises(ValueError, match=f"one value per step: got {len(scales)} for {STEPS} steps"):
        denoise(model, timesteps=get_schedule(STEPS, 16), guidance_model=TokenMLPGuidance(), guidance_scale=scales, **inputs)


def test_guidance_model_sees_each_step_and_callback_sees_the_chain() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    ts = get_schedule(STEPS, 16)
    seen: list[tuple[int, torch.Tensor]] = []

    def recording(img, pred, txt, vec, t, step_idx):
        seen.append((step_idx, t.clone()))
        return guide(img, pred, txt, vec, t, step_idx)

    calls: list[tuple] = []
    out = denoise(
        model, timesteps=ts, guidance_model=recording, guidance_scale=1.5,
        callback=lambda *args: calls.append(args), **inputs,
    )
    assert [i for i, _ in seen] == list(range(STEPS))
    for (i, t), t_curr in zip(seen, ts[:-1]):
        assert t.shape == (2,) and torch.all(t == t_curr)
    assert [(c[0], c[1], c[2]) for c in calls] == [(i, ts[i], ts[i + 1]) for i in range(STEPS)]
    assert torch.equal(calls[0][3], inputs["img"])
    for i, (_, t_curr, t_prev, img, pred, pred_used) in enumerate(calls):
        assert not torch.equal(pred, pred_used)
        nxt = calls[i + 1][3] if i + 1 < STEPS else out
        assert torch.equal(nxt, img + (t_prev - t_curr) * pred_used)


# ---------------------------------------------------------------- differentiable mode


def final_loss(model: nn.Module, guide: nn.Module, inputs: dict, ts: list[float], weight: torch.Tensor, **kw) -> torch.Tensor:
    out = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=1.0, guidance_requires_grad=True, **inputs, **kw)
    return (out * weight).sum()


def test_gradient_matches_finite_differences() -> None:
    dtype = torch.float64
    model, inputs, guide = fixed_tiny_flux(dtype=dtype), make_inputs(dtype=dtype), random_guidance(dtype=dtype)
    ts = get_schedule(STEPS, 16)
    weight = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    loss = final_loss(model, guide, inputs, ts, weight, gradient_checkpointing=False)
    grads = torch.autograd.grad(loss, list(guide.parameters()))
    params = dict(guide.named_parameters())
    grad_of = dict(zip(params, grads))
    # diffusers computes the rotary embedding in float32 even for a float64 model, so the loss carries float32
    # rounding (about 1e-8 here). A five-point stencil with h = 1e-2 keeps that noise and its O(h^4) truncation
    # error near 1e-6 relative; the two-point one would need h small enough for the rounding to dominate.
    h = 1e-2
    picks = [("net.0.weight", (0, 0)), ("net.0.weight", (5, 20)), ("net.0.bias", (3,)), ("net.2.weight", (7, 2)),
             ("net.2.bias", (11,))]
    with torch.no_grad():
        for name, idx in picks:
            p = params[name]
            orig = p[idx].item()
            f = {}
            for k in (-2, -1, 1, 2):
                p[idx] = orig + k * h
                f[k] = final_loss(model, guide, inputs, ts, weight).item()
            p[idx] = orig
            fd = (-f[2] + 8 * f[1] - 8 * f[-1] + f[-2]) / (12 * h)
            assert abs(grad_of[name][idx].item()) > 1e-2, f"{name}{idx}: pick a parameter with a real gradient"
            assert grad_of[name][idx].item() == pytest.approx(fd, rel=2e-5), name


def test_checkpointing_gives_the_same_gradients() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    model.requires_grad_(True)  # gradients into the base model too (fine-tuning) must agree as well
    ts = get_schedule(6, 16)
    weight = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(9))
    params = list(guide.parameters()) + list(model.parameters())
    plain = torch.autograd.grad(final_loss(model, guide, inputs, ts, weight, gradient_checkpointing=False), params)
    ckpt = torch.autograd.grad(final_loss(model, guide, inputs, ts, weight, gradient_checkpointing=True), params)
    assert any(g.abs().max() > 1e-3 for g in plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_grad_last_k_is_truncated_backprop() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    ts = get_schedule(6, 16)
    k = 2
    weight = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(9))
    params = list(guide.parameters())
    for ckpt in (True, False):
        got = torch.autograd.grad(
            final_loss(model, guide, inputs, ts, weight, grad_last_k=k, gradient_checkpointing=ckpt), params
        )
        # Manual: the first steps without a graph, then a differentiable loop over the last k steps only.
        with torch.no_grad():
            start = denoise(model, timesteps=ts[: len(ts) - k], guidance_model=guide, **inputs)
        tail_inputs = dict(inputs, img=start)
        want = torch.autograd.grad(final_loss(model, guide, tail_inputs, ts[-k - 1 :], weight), params)
        full = torch.autograd.grad(final_loss(model, guide, inputs, ts, weight), params)
        for a, b, c in zip(got, want, full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert any((a - c).abs().max() > 1e-4 for a, c in zip(got, full)), "truncation must change the gradient"


def test_guidance_used_only_before_the_last_k_steps_gets_no_gradient() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    ts = get_schedule(5, 16)
    scales = [1.0, 1.0, 1.0, 0.0, 0.0]  # the guidance acts in the first three steps only
    weight = torch.randn(inputs["img"].shape, generator=torch.Generator().manual_seed(9))

    def loss(**kw: object) -> torch.Tensor:
        out = denoise(model, timesteps=ts, guidance_model=guide, guidance_scale=scales, guidance_requires_grad=True,
                      **inputs, **kw)
        return (out * weight).sum()

    full = torch.autograd.grad(loss(), list(guide.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().max() > 1e-4 for g in full)
    truncated = torch.autograd.grad(loss(grad_last_k=2), list(guide.parameters()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in truncated)


def count_saved_tensors(fn: object) -> tuple[torch.Tensor, int]:
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # type: ignore[operator]
    return out, saved


def test_without_requires_grad_no_graph_is_kept() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    model.requires_grad_(True)
    inputs["img"].requires_grad_(True)
    ts = get_schedule(STEPS, 16)
    out, saved = count_saved_tensors(lambda: denoise(model, timesteps=ts, guidance_model=guide, **inputs))
    assert saved == 0 and not out.requires_grad and out.grad_fn is None
    out, saved = count_saved_tensors(
        lambda: denoise(model, timesteps=ts, guidance_model=guide, guidance_requires_grad=True,
                        gradient_checkpointing=False, **inputs)
    )
    assert saved > 0 and out.requires_grad


# ---------------------------------------------------------------- bad input


class WrongShape(nn.Module):
    def forward(self, img, pred, txt, vec, t, step_idx):
        return pred[..., :-1]


def test_wrong_correction_shape_raises() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    with pytest.raises(ValueError, match=r"correction of shape \(2, 16, 15\), but pred has shape \(2, 16, 16\)"):
        denoise(model, timesteps=get_schedule(STEPS, 16), guidance_model=WrongShape(), **inputs)


def test_non_finite_prediction_raises() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    with torch.no_grad():
        model.transformer.proj_out.bias[3] = float("nan")  # a diverged base model
    ts = get_schedule(STEPS, 16)
    with pytest.raises(FloatingPointError, match=r"non-finite values in the model prediction at step 0 \(t=1.0000\): 32 of 512"):
        denoise(model, timesteps=ts, **inputs)
    assert torch.isnan(denoise(model, timesteps=ts, check_finite_values=False, **inputs)).any()


def test_non_finite_correction_raises() -> None:
    model, inputs, guide = fixed_tiny_flux(), make_inputs(), random_guidance()
    with torch.no_grad():
        guide.net[-1].bias[0] = float("inf")  # a diverged guidance model
    with pytest.raises(FloatingPointError, match=r"guided prediction \(pred \+ scale \* correction\) at step 0"):
        denoise(model, timesteps=get_schedule(STEPS, 16), guidance_model=guide, **inputs)


@pytest.mark.parametrize("timesteps", [[], [1.0]])
def test_fewer_than_two_timesteps_raise(timesteps: list[float]) -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    with pytest.raises(ValueError, match=r"at least 2 values \(num_steps >= 1\)"):
        denoise(model, timesteps=timesteps, **inputs)


@pytest.mark.parametrize(("key", "batch", "match"), [
    ("txt", 3, r"batch sizes differ: img \(2, 16, 16\), txt \(3, 5, 32\), vec \(2, 32\)"),
    ("vec", 1, r"batch sizes differ: img \(2, 16, 16\), txt \(2, 5, 32\), vec \(1, 32\)"),
    ("img", 4, r"batch sizes differ: img \(4, 16, 16\)"),
])
def test_mismatched_batch_sizes_raise(key: str, batch: int, match: str) -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    inputs[key] = make_inputs(batch=batch)[key]
    with pytest.raises(ValueError, match=match):
        denoise(model, timesteps=get_schedule(STEPS, 16), **inputs)


def test_bad_shapes_raise() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    ts = get_schedule(STEPS, 16)
    with pytest.raises(ValueError, match=r"img must be packed latents \(B, seq, C\), got shape \(2, 16, 4, 4\)"):
        denoise(model, timesteps=ts, **dict(inputs, img=inputs["img"].reshape(2, 16, 4, 4)))
    with pytest.raises(ValueError, match="img_ids has 15 positions but img has seq 16"):
        denoise(model, timesteps=ts, **dict(inputs, img_ids=inputs["img_ids"][:15]))
    with pytest.raises(ValueError, match=r"txt must be \(B, L, D\) and vec \(B, D\), got \(2, 5, 32\) and \(2, 1, 32\)"):
        denoise(model, timesteps=ts, **dict(inputs, vec=inputs["vec"][:, None]))


@pytest.mark.parametrize("k", [0, STEPS + 1])
def test_bad_grad_last_k_raises(k: int) -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    with pytest.raises(ValueError, match=rf"grad_last_k must be in \[1, {STEPS}\] \(the number of steps\), got {k}"):
        denoise(model, timesteps=get_schedule(STEPS, 16), guidance_requires_grad=True, grad_last_k=k, **inputs)


def test_bfl_wrapper_requires_guidance_for_distilled_models() -> None:
    model: BFLFlux = fixed_tiny_flux(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance-distilled"):
        denoise(model, timesteps=get_schedule(STEPS, 16), guidance=None, **make_inputs())
