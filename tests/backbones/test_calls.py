"""Base-model call counting (fluxguide.backbones.calls): what the time-to-quality benchmark adds up."""

from __future__ import annotations

import torch

from fluxguide.backbones.calls import MODEL_CALLS, ModelCalls
from fluxguide.backbones.registry import build_backbone
from fluxguide.sampling import denoise

PROMPTS = ["a red circle", "a blue bar above a green triangle"]


def test_sampling_counts_one_forward_per_image_and_step_and_cfg_two(shapes_random) -> None:
    calls = ModelCalls()
    calls.attach(calls.attach(shapes_random))  # attaching twice counts once
    with calls.phase("base"), torch.no_grad():
        shapes_random.sample(PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(0))
    with calls.phase("cfg"), torch.no_grad():
        shapes_random.sample(PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(0), cfg_scale=3.0)
    assert (calls.forwards["base"], calls.forwards["cfg"], calls.forwards["train"]) == (6, 12, 0)
    assert calls.cost("base") == 6 and calls.backwards["base"] == 0


def _differentiable_sample(world, checkpointing: bool) -> torch.Tensor:
    """Sample 4 steps with a one-parameter correction and return the loss of the result."""
    scale = torch.nn.Parameter(torch.tensor(0.1))
    cond = world.encode(PROMPTS)
    img = world.noise(len(PROMPTS), torch.Generator().manual_seed(1))
    out = denoise(world, img, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, world.schedule(4),
                  guidance=world.default_guidance, guidance_model=lambda img, pred, *a: scale * pred,
                  guidance_requires_grad=True, gradient_checkpointing=checkpointing)
    return out.square().mean()


def test_a_backward_through_the_model_counts_and_weighs_two_forwards(shapes_random) -> None:
    for checkpointing in (False, True):
        calls = ModelCalls()
        calls.attach(shapes_random)
        loss = _differentiable_sample(shapes_random, checkpointing)
        assert calls.backwards["train"] == 0  # counted when the gradient arrives, not before
        loss.backward()
        # The first step's prediction depends on the noise only (the model's weights are frozen): 3 of 4 steps
        # carry a gradient back through the model; checkpointing reruns each differentiable step's forward.
        assert calls.backwards["train"] == 2 * 3
        assert calls.forwards["train"] == 2 * 4 + (2 * 4 if checkpointing else 0)
        assert calls.cost() == calls.forwards["train"] + 12


def test_every_backbone_the_registry_builds_counts_in_the_process_counter() -> None:
    world = build_backbone("shapes-random", seed=0)
    before = MODEL_CALLS.cost("test-phase")
    with MODEL_CALLS.phase("test-phase"), torch.no_grad():
        world.sample(PROMPTS[:1], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert MODEL_CALLS.cost("test-phase") - before == 2
    assert MODEL_CALLS.current == "train"
