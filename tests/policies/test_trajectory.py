"""A new guidance model leaves the sampler's trajectory unchanged, bit for bit; a trained one changes it."""

from __future__ import annotations

import pytest
import torch

from fluxguide.policies import MultiObjectiveGuidance, StepSpecificGuidance, make_deterministic_actor
from fluxguide.sampling import denoise, get_schedule

ARCHS = ("mlp", "attention", "conv")


def sample(flux, inputs, world, guidance_model=None, guidance_scale=1.0):
    i = inputs
    timesteps = get_schedule(4, world.seq)
    return denoise(
        flux,
        i["img"],
        i["img_ids"],
        i["txt"],
        i["txt_ids"],
        i["vec"],
        timesteps,
        None,
        guidance_model,
        guidance_scale,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_model_reproduces_the_base_sampler_bit_for_bit(
    arch, world, make_guidance, make_flux, sampler_inputs, perturb
):
    flux, inputs = make_flux(world), sampler_inputs(world)
    base = sample(flux, inputs, world)
    fresh = make_guidance(arch, world)
    assert torch.equal(sample(flux, inputs, world, fresh, guidance_scale=2.0), base)
    composite = MultiObjectiveGuidance(
        [fresh, StepSpecificGuidance({(1, 3): make_guidance(arch, world)})], [1.0, 0.5]
    )
    assert torch.equal(sample(flux, inputs, world, composite), base)
    # A trained model does change the trajectory (so the equality above is not vacuous).
    trained = sample(flux, inputs, world, perturb(make_guidance(arch, world), std=0.05))
    assert torch.isfinite(trained).all() and not torch.equal(trained, base)


def test_deterministic_actor_step_matches_the_denoise_guidance(
    shapes_world, make_guidance, make_flux, sampler_inputs, perturb
):
    """The TorchRL actor and ``denoise``'s guidance call compute the same correction for the same state."""
    from tensordict import TensorDict

    from fluxguide import keys

    world = shapes_world
    flux, inputs = make_flux(world), sampler_inputs(world)
    model = perturb(make_guidance("conv", world), std=0.05)
    seen = []
    sample(flux, inputs, world, lambda *a: seen.append(a) or model(*a))
    actor = make_deterministic_actor(model)
    for img, pred, txt, vec, t, step in seen:
        b = img.shape[0]
        obs = {keys.IMG: img, keys.PRED: pred, keys.TXT: txt, keys.VEC: vec, keys.T: t[:, None]}
        td = TensorDict({**obs, keys.STEP: torch.full((b, 1), step)}, batch_size=[b])
        torch.testing.assert_close(actor(td)[keys.ACTION], model(img, pred, txt, vec, t, step))
    assert len(seen) == 4
