"""``denoise_with_state_collection``: the same sampler as ``denoise``, plus every step's state.

The base model is the tiny real diffusers Flux of ``tests/sampling/__init__.py``; states are checked
against the model recomputed at each recorded state and against the Euler / SDE step formulas.
"""

from __future__ import annotations

import pytest
import torch

from fluxguide import keys
from fluxguide.sampling import denoise, euler_step, get_schedule, instrumented, sde_mean, sde_step_std
from fluxguide.sampling.instrumented import NEXT_IMG, PRED_USED, T_PREV, denoise_with_state_collection
from tests.sampling import TokenMLPGuidance, fixed_tiny_flux, make_inputs

STEPS = 5


def nonzero_guidance() -> TokenMLPGuidance:
    torch.manual_seed(3)
    return TokenMLPGuidance(zero_init=False)


def test_keys_agree_with_the_policy_keys() -> None:
    # sampling sits below policies, so it spells the keys itself; they must be the same strings.
    assert (instrumented.IMG, instrumented.PRED, instrumented.TXT, instrumented.VEC, instrumented.T,
            instrumented.STEP) == keys.OBSERVATION_KEYS


@pytest.mark.parametrize("with_guidance", [False, True])
def test_ode_states_match_denoise_bit_for_bit(with_guidance: bool) -> None:
    model, inputs = fixed_tiny_flux(), make_inputs(batch=3)
    ts = get_schedule(STEPS, inputs["img"].shape[1])
    guide = nonzero_guidance() if with_guidance else None
    want = denoise(model, timesteps=ts, guidance=3.5, guidance_model=guide, guidance_scale=0.5, **inputs)
    final, states = denoise_with_state_collection(
        model, timesteps=ts, guidance=3.5, guidance_model=guide, guidance_scale=0.5, **inputs
    )
    assert torch.equal(final, want)
    assert states.batch_size == torch.Size([3])
    assert states[keys.IMG].shape == (3, STEPS, *inputs["img"].shape[1:])
    # Per-episode constants are stored once per sample, not once per step.
    assert states[keys.TXT].shape == inputs["txt"].shape and states[keys.VEC].shape == inputs["vec"].shape
    assert torch.equal(states[keys.IMG][:, 0], inputs["img"])
    assert torch.equal(states[keys.STEP], torch.arange(STEPS).expand(3, STEPS))
    assert torch.allclose(states[keys.T][0], torch.tensor(ts[:-1]))
    assert torch.allclose(states[T_PREV][0], torch.tensor(ts[1:]))
    g = torch.full((3,), 3.5)
    for k in range(STEPS):
        img_k = states[keys.IMG][:, k]
        t_vec = torch.full((3,), ts[k])
        pred = model(img=img_k, img_ids=inputs["img_ids"], txt=inputs["txt"], txt_ids=inputs["txt_ids"],
                     y=inputs["vec"], timesteps=t_vec, guidance=g)
        assert torch.equal(states[keys.PRED][:, k], pred)
        used = pred + 0.5 * guide(img_k, pred, inputs["txt"], inputs["vec"], t_vec, k) if guide else pred
        assert torch.equal(states[PRED_USED][:, k], used)
        nxt = euler_step(img_k, states[PRED_USED][:, k], ts[k], ts[k + 1])
        assert torch.equal(nxt, states[keys.IMG][:, k + 1] if k + 1 < STEPS else final)
    assert (states[PRED_USED] - states[keys.PRED]).abs().max() > 0 if with_guidance else True


def test_save_states_false_returns_no_states() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    ts = get_schedule(STEPS, inputs["img"].shape[1])
    final, states = denoise_with_state_collection(model, timesteps=ts, guidance=3.5, save_states=False, **inputs)
    assert states is None
    assert torch.equal(final, denoise(model, timesteps=ts, guidance=3.5, **inputs))


def test_sde_trajectory_follows_the_flow_grpo_step() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs(batch=4, h=8, w=8)
    ts = get_schedule(STEPS, inputs["img"].shape[1])
    run = lambda seed: denoise_with_state_collection(
        model, timesteps=ts, guidance=3.5, noise_level=0.7, generator=torch.Generator().manual_seed(seed), **inputs
    )
    final, states = run(0)
    final_again, _ = run(0)
    final_other, _ = run(1)
    assert torch.equal(final, final_again)
    assert not torch.allclose(final, final_other)
    assert not torch.allclose(final, denoise(model, timesteps=ts, guidance=3.5, **inputs))
    assert torch.equal(states[NEXT_IMG][:, :-1], states[keys.IMG][:, 1:])
    assert torch.equal(states[NEXT_IMG][:, -1], final)
    for k in range(STEPS):
        mean = sde_mean(states[keys.IMG][:, k], states[PRED_USED][:, k], ts[k], ts[k + 1], 0.7)
        z = (states[NEXT_IMG][:, k] - mean) / sde_step_std(ts[k], ts[k + 1], 0.7)
        # The injected noise is standard normal (4 * 64 * 16 = 4096 draws per step).
        assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


def test_negative_noise_level_is_an_error() -> None:
    model, inputs = fixed_tiny_flux(), make_inputs()
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        denoise_with_state_collection(model, timesteps=get_schedule(2, 16), noise_level=-0.1, **inputs)
