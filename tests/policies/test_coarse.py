"""Coarse corrections: the projection, the wrapper that saves with the policy, and the exact coarse Gaussian
that PPO explores with (samples are coarse, log-probs are the density of the patch means, ratio 1 at start)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torchrl.objectives import ClipPPOLoss

from fluxguide import keys
from fluxguide.policies import (
    CoarseGuidance,
    CoarseNormal,
    coarse_coordinates,
    load_guidance_model,
    make_probabilistic_actor,
    make_value_network,
    project_coarse,
    save_guidance_model,
)
from tests.policies.conftest import obs_td


def test_projection_is_the_mean_of_each_channel_over_the_token_pixels(world):
    x = torch.randn(2, world.seq, world.channels)
    z = coarse_coordinates(x, world.in_channels)
    assert z.shape == (2, world.seq, world.in_channels)
    # packed order is (c ph pw): channel c owns entries c*p*p ... (c+1)*p*p - 1 of a token
    group = world.patch**2
    torch.testing.assert_close(z[0, 5, 1], x[0, 5, group : 2 * group].mean())
    p = project_coarse(x, world.in_channels)
    torch.testing.assert_close(project_coarse(p, world.in_channels), p)  # idempotent
    torch.testing.assert_close(coarse_coordinates(p, world.in_channels), z)
    # orthogonal: the residual has no coarse part
    torch.testing.assert_close(coarse_coordinates(x - p, world.in_channels), torch.zeros_like(z), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of channels=5"):
        coarse_coordinates(x, 5)


def test_coarse_guidance_is_zero_at_init_coarse_after_and_round_trips(world, make_guidance, make_observation,
                                                                      perturb, tmp_path):
    obs = make_observation(world)
    step = torch.full((3,), 2)
    fresh = CoarseGuidance(make_guidance("attention", world), world.in_channels)
    assert fresh(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], step).abs().max() == 0
    model = CoarseGuidance(perturb(make_guidance("attention", world)), world.in_channels)
    out = model(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], step)
    assert out.abs().max() > 0
    torch.testing.assert_close(out, project_coarse(out, world.in_channels))
    save_guidance_model(model, tmp_path / "g.safetensors")
    loaded = load_guidance_model(tmp_path / "g.safetensors")
    assert isinstance(loaded, CoarseGuidance) and loaded.channels == world.in_channels
    torch.testing.assert_close(loaded(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], step), out)
    with pytest.raises(ValueError, match="positive channel count"):
        CoarseGuidance(make_guidance("mlp", world), 0)


def test_coarse_normal_samples_coarse_actions_with_the_exact_patch_mean_density():
    loc, scale = torch.randn(4, 16, 48), torch.rand(4, 1, 1) + 0.1
    p = CoarseNormal(loc, scale, "sum", channels=3)
    x = p.sample()
    assert x.shape == (4, 16, 48) and p.batch_shape == (4,) and p.event_shape == (16, 48)
    torch.testing.assert_close(project_coarse(x, 3), x)
    torch.testing.assert_close(p.loc, project_coarse(loc, 3))  # the mean is projected too
    # every pixel's noise has std `scale`; the density is the Gaussian of the 16 x 3 patch means
    ref = Normal(coarse_coordinates(p.loc, 3), scale.expand(4, 16, 3))
    torch.testing.assert_close(p.log_prob(x), ref.log_prob(coarse_coordinates(x, 3)).sum((-2, -1)))
    torch.testing.assert_close(p.entropy(), ref.entropy().sum((-2, -1)))
    pm = CoarseNormal(loc, scale, "mean", channels=3)
    torch.testing.assert_close(pm.log_prob(x), p.log_prob(x) / (16 * 3))
    q_loc, q_scale = torch.randn(4, 16, 48), torch.rand(4, 1, 1) + 0.1
    q = CoarseNormal(q_loc, q_scale, "sum", channels=3)
    ref_q = Normal(coarse_coordinates(q.loc, 3), q_scale.expand(4, 16, 3))
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(ref, ref_q).sum((-2, -1)))
    with pytest.raises(ValueError, match="same reduction and channels"):
        kl_divergence(pm, q)
    # pixel std: 10,000 samples of one coordinate
    many = CoarseNormal(torch.zeros(10_000, 1, 48), torch.full((10_000, 1, 1), 0.5), channels=3).sample()
    assert abs(many[:, 0, 7].std().item() - 0.5) < 0.02
    assert bool((many[:, 0, :16] == many[:, 0, :1]).all())  # one value over a channel's pixels


def test_coarse_actor_explores_coarsely_and_ppo_starts_at_ratio_one(world, make_guidance, make_observation,
                                                                    perturb):
    model = CoarseGuidance(perturb(make_guidance("mlp", world), std=0.05), world.in_channels)
    actor = make_probabilistic_actor(model, std=0.3, coarse_channels=world.in_channels)
    td = actor(obs_td(world, make_observation)).detach()
    action = td[keys.ACTION]
    torch.testing.assert_close(project_coarse(action, world.in_channels), action)
    assert (action - td[keys.LOC]).abs().max() > 0
    assert isinstance(actor.get_dist(td), CoarseNormal)
    td["advantage"] = torch.tensor([[1.0], [-0.5], [0.2]])
    td["value_target"] = torch.zeros(3, 1)
    critic = make_value_network(world.channels, hidden_dim=16, vec_dim=world.vec_dim)
    out = ClipPPOLoss(actor, critic, clip_epsilon=0.2)(td)
    assert out["clip_fraction"].item() == 0
    torch.testing.assert_close(out["ESS"], torch.tensor(1.0))
    out["loss_objective"].backward()
    assert model.model.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ODE mode"):
        make_probabilistic_actor(model, use_sde_std=True, coarse_channels=world.in_channels)


@pytest.mark.parametrize("coarse", [False, True])
def test_exploration_stops_where_the_policy_stops_acting(world, make_guidance, make_observation, perturb, coarse):
    """explore_min_t: later steps act with the mean, add 0 to the log-prob and entropy, and keep ratio 1."""
    channels = world.in_channels if coarse else None
    model = perturb(make_guidance("mlp", world), std=0.05)
    actor = make_probabilistic_actor(model, std=0.3, explore_min_t=0.5, coarse_channels=channels,
                                     log_prob_reduction="sum")
    td = obs_td(world, make_observation, batch=4)
    td[keys.T] = torch.tensor([[0.9], [0.5], [0.3], [0.1]])  # explore, explore (boundary), mean, mean
    td = actor(td).detach()
    noise = (td[keys.ACTION] - actor.get_dist(td).loc).flatten(1).abs().amax(1)
    assert bool((noise[:2] > 0).all()) and bool((noise[2:] == 0).all())
    dist = actor.get_dist(td)
    assert bool((td[keys.LOG_PROB][2:] == 0).all()) and bool(torch.isfinite(td[keys.LOG_PROB]).all())
    assert bool((dist.entropy()[2:] == 0).all()) and bool((dist.entropy()[:2] != 0).all())
    assert bool((kl_divergence(dist, dist) == 0).all())
    td["advantage"] = torch.tensor([[1.0], [-0.5], [0.2], [2.0]])
    out = ClipPPOLoss(actor, None, clip_epsilon=0.2, entropy_bonus=False)(td)
    out["loss_objective"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    with pytest.raises(ValueError, match="explore_min_t must be in"):
        make_probabilistic_actor(model, explore_min_t=1.0)
    with pytest.raises(ValueError, match="ODE mode"):
        make_probabilistic_actor(model, use_sde_std=True, explore_min_t=0.5)
