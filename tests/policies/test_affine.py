"""The affine schedule policy: zero at init, exactly a(t) img + b(t) pred per channel, saved and rebuilt."""

from __future__ import annotations

import pytest
import torch

from fluxguide.policies import AffineGuidance, load_guidance_model, save_guidance_model
from fluxguide.policies.embeddings import timestep_embedding


def test_affine_guidance_is_a_per_channel_schedule_of_img_and_pred(world, make_observation, tmp_path):
    obs = make_observation(world)
    model = AffineGuidance(world.channels, world.in_channels, time_dim=16)
    call = (obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], 3)
    assert model(*call).abs().max() == 0  # zero-initialised: the base sampler
    with torch.no_grad():
        model.coefficients.weight.normal_(0, 0.3)
        model.coefficients.bias.normal_(0, 0.3)
    out = model(*call)
    coef = model.coefficients(timestep_embedding(obs["t"], 16)).detach()
    group = world.channels // world.in_channels
    for c in range(world.in_channels):  # channel c owns token entries c*group ... (c+1)*group - 1
        sl = slice(c * group, (c + 1) * group)
        a, b = coef[:, c, None, None], coef[:, world.in_channels + c, None, None]
        expected = a * obs["img"][..., sl] + b * obs["pred"][..., sl]
        torch.testing.assert_close(out[..., sl], expected)
    save_guidance_model(model, tmp_path / "affine.safetensors")
    loaded = load_guidance_model(tmp_path / "affine.safetensors")
    assert isinstance(loaded, AffineGuidance)
    assert sum(p.numel() for p in loaded.parameters()) == 17 * 2 * world.in_channels  # (16 weights + bias) x 2C
    torch.testing.assert_close(loaded(*call), out)


def test_affine_guidance_rejects_bad_sizes(world, make_observation):
    with pytest.raises(ValueError, match="multiple of channels=5"):
        AffineGuidance(world.channels, 5)
    obs = make_observation(world)
    model = AffineGuidance(world.channels + world.in_channels, world.in_channels)
    with pytest.raises(ValueError, match=str(world.channels)):
        model(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], 0)



def test_affine_guidance_takes_any_token_count(world, make_observation):
    """A per-token schedule reads no positions, so a non-square token grid (a 32x48 Flux image: 2x3 tokens) is
    guided as any other; it used to stop on "not a square token grid"."""
    obs = make_observation(world)
    model = AffineGuidance(world.channels, world.in_channels, time_dim=16)
    with torch.no_grad():
        model.coefficients.bias.fill_(0.5)
    img, pred = obs["img"][:, :6], obs["pred"][:, :6]  # 6 tokens: not a square
    out = model(img, pred, obs["txt"], obs["vec"], obs["t"], 0)
    torch.testing.assert_close(out, model(obs["img"], obs["pred"], obs["txt"], obs["vec"], obs["t"], 0)[:, :6])

def _obs_td(world, make_observation, times):
    from tensordict import TensorDict

    from fluxguide import keys

    batch = len(times)
    obs = make_observation(world, batch=batch)
    return TensorDict({keys.IMG: obs["img"], keys.PRED: obs["pred"], keys.TXT: obs["txt"], keys.VEC: obs["vec"],
                       keys.T: torch.tensor(times)[:, None], keys.STEP: torch.full((batch, 1), 1)}, batch_size=[batch])


def test_subspace_normal_recovers_the_coefficients_and_their_exact_density(world, make_observation):
    from torch.distributions import Normal

    from fluxguide.policies import SubspaceNormal

    obs = make_observation(world, batch=4)
    basis = AffineGuidance(world.channels, world.in_channels).basis(obs["img"], obs["pred"])
    k = 2 * world.in_channels
    assert basis.shape == (4, k, world.seq, world.channels)
    loc, scale = torch.randn(4, k), torch.rand(4, 1) + 0.1
    dist = SubspaceNormal(loc, scale, basis, "sum")
    action = dist.sample()
    assert action.shape == (4, world.seq, world.channels) and dist.event_shape == (world.seq, world.channels)
    coefficients = dist.coordinates(action)
    ref = Normal(loc, scale.expand(4, k))
    torch.testing.assert_close(dist.log_prob(action), ref.log_prob(coefficients).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dist.coordinates(dist.deterministic_sample), loc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(SubspaceNormal(loc, scale, basis).log_prob(action), dist.log_prob(action) / k)
    with pytest.raises(ValueError, match="must be \\(\\*batch, K, seq, C\\)"):
        SubspaceNormal(loc[:, :3], scale, basis)


def test_coefficient_actor_acts_like_the_policy_explores_its_coefficients_and_starts_at_ratio_one(
    world, make_observation
):
    from torchrl.envs.utils import ExplorationType, set_exploration_type
    from torchrl.objectives import ClipPPOLoss

    from fluxguide import keys
    from fluxguide.policies import TimestepRangeGuidance, make_coefficient_actor

    affine = AffineGuidance(world.channels, world.in_channels, time_dim=8)
    with torch.no_grad():
        affine.coefficients.bias.normal_(0, 0.3)
    policy = TimestepRangeGuidance([((0.5, 1.0), affine)])
    actor = make_coefficient_actor(policy, std=0.2, log_prob_reduction="sum")
    td = _obs_td(world, make_observation, [0.9, 0.6, 0.3])  # the last one is past min_t: no guidance, no noise
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        mean = actor(td.clone())[keys.ACTION]
    expected = policy(td[keys.IMG], td[keys.PRED], td[keys.TXT], td[keys.VEC], td[keys.T][:, 0], 1)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)
    sampled = actor(td.clone()).detach()
    dist = actor.get_dist(sampled)
    noise = dist.coordinates(sampled[keys.ACTION]) - sampled[keys.LOC]
    assert bool((noise[:2].abs() > 0).any()) and noise[2].abs().max() < 1e-5  # explores only where it acts
    assert sampled[keys.LOG_PROB][2] == 0 and bool(torch.isfinite(sampled[keys.LOG_PROB]).all())
    sampled["advantage"] = torch.tensor([[1.0], [-1.0], [0.5]])
    out = ClipPPOLoss(actor, None, clip_epsilon=0.2, entropy_bonus=False)(sampled)
    assert out["clip_fraction"].item() == 0
    torch.testing.assert_close(out["ESS"], torch.tensor(1.0))
    out["loss_objective"].backward()
    assert affine.coefficients.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="needs an AffineGuidance policy"):
        make_coefficient_actor(torch.nn.Linear(2, 2))


def test_subspace_normal_with_an_offset_explores_around_it(world, make_observation):
    from fluxguide.policies import SubspaceNormal

    obs = make_observation(world, batch=3)
    basis = AffineGuidance(world.channels, world.in_channels).basis(obs["img"], obs["pred"])
    k = 2 * world.in_channels
    loc, scale, shift = torch.randn(3, k), torch.rand(3, 1) + 0.1, torch.randn(3, k)
    offset = torch.einsum("bk,bksc->bsc", shift, basis)  # an offset inside the span: its coordinates are `shift`
    plain, shifted = SubspaceNormal(loc, scale, basis, "sum"), SubspaceNormal(loc, scale, basis, "sum", offset=offset)
    torch.testing.assert_close(shifted.deterministic_sample, plain.deterministic_sample + offset)
    action = shifted.sample()
    torch.testing.assert_close(shifted.log_prob(action), plain.log_prob(action - offset), rtol=1e-4, atol=1e-4)
    # The offset is not explored: the plain mean is `shift` away from the shifted one, in coefficient units.
    drop = (shift.square() / (2 * scale.square())).sum(-1)
    torch.testing.assert_close(shifted.log_prob(plain.mean), plain.log_prob(plain.mean) - drop, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="offset .* must be \\(\\*batch, seq, C\\)"):
        SubspaceNormal(loc, scale, basis, offset=offset[:, :-1])


def test_coefficient_actor_explores_the_affine_head_of_a_network(world, make_observation):
    from torchrl.envs.utils import ExplorationType, set_exploration_type
    from torchrl.objectives import ClipPPOLoss

    from fluxguide import keys
    from fluxguide.policies import (
        MultiObjectiveGuidance,
        TimestepRangeGuidance,
        is_coefficient_policy,
        make_coefficient_actor,
    )
    from tests.policies.conftest import build_guidance, randomize

    body = randomize(build_guidance("mlp", world))
    affine = AffineGuidance(world.channels, world.in_channels, time_dim=8)  # zero at the start, as --head builds it
    policy = MultiObjectiveGuidance([body, TimestepRangeGuidance([((0.5, 1.0), affine)])])
    assert is_coefficient_policy(policy) and not is_coefficient_policy(body)
    actor = make_coefficient_actor(policy, std=0.2, log_prob_reduction="sum")
    td = _obs_td(world, make_observation, [0.9, 0.6, 0.3])  # the last is past the head's min_t: no exploration
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        mean = actor(td.clone())[keys.ACTION]
    expected = policy(td[keys.IMG], td[keys.PRED], td[keys.TXT], td[keys.VEC], td[keys.T][:, 0], 1)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)  # the saved policy samples as it trained
    assert mean.abs().max() > 0  # the network's correction, under a zero head
    sampled = actor(td.clone()).detach()
    torch.testing.assert_close(sampled[keys.ACTION][2], expected[2], rtol=1e-5, atol=1e-5)
    residual = actor.get_dist(sampled).coordinates(sampled[keys.ACTION]) - sampled[keys.LOC]
    assert bool((residual[:2].abs() > 0).any())  # explored in the head's coefficients where it acts
    sampled["advantage"] = torch.tensor([[1.0], [-1.0], [0.5]])
    out = ClipPPOLoss(actor, None, clip_epsilon=0.2, entropy_bonus=False)(sampled)
    torch.testing.assert_close(out["ESS"], torch.tensor(1.0))  # ratio 1 before any update
    out["loss_objective"].backward()
    assert affine.coefficients.weight.grad.abs().sum() > 0
    assert sum(float(p.grad.abs().sum()) for p in body.parameters() if p.grad is not None) > 0  # through the offset
