"""``sampling.model_velocity``: the one call of a base model at a float time, shared by ``Backbone.velocity``, the
sampler and the envs, so each evaluates the model exactly as the others do."""

from __future__ import annotations

import torch

from fluxguide.sampling import denoise, model_velocity


def test_the_backbone_the_sampler_and_the_env_call_the_model_alike(shapes_random) -> None:
    from fluxguide.envs import GuidanceCore

    world = shapes_random
    cond = world.encode(["a red circle", "a blue bar above a green triangle"])
    img = world.noise(2, torch.Generator().manual_seed(0))
    t = world.schedule(4)
    direct = world(img=img, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids,
                   timesteps=torch.full((2,), t[0]), y=cond.vec, guidance=None)
    assert torch.equal(model_velocity(world, img, t[0], cond), direct)
    assert torch.equal(world.velocity(img, torch.full((2,), t[0]), cond), direct)  # a (B,) time as it is

    preds = []
    denoise(world, img, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, t, guidance=None,
            callback=lambda i, tc, tp, x, pred, used: preds.append(pred))
    assert torch.equal(preds[0], direct)

    core = GuidanceCore(world, reward="shapes-clip", prompts=["a red circle"], num_steps=4, verify=False)
    obs, _ = core.reset(seed=0)
    assert torch.equal(obs["pred"], world.velocity(obs["img"], t[0], core.cond))
