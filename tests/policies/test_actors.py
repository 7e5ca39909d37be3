"""TorchRL wrappers: deterministic actor, Gaussian ProbabilisticActor (log-probs, SDE relation), critic."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import ClipPPOLoss

from fluxguide import keys
from fluxguide.policies import (
    ReducedNormal,
    make_deterministic_actor,
    make_probabilistic_actor,
    make_value_network,
)
from fluxguide.sampling import (
    get_schedule,
    sde_action_coefficient,
    sde_action_std,
    sde_log_prob_offset,
    sde_mean,
    sde_step,
)
from tests.policies.conftest import obs_td

ARCHS = ("mlp", "attention", "conv")


def direct(model, td):
    return model(
        td[keys.IMG], td[keys.PRED], td[keys.TXT], td[keys.VEC], td[keys.T][:, 0], int(td[keys.STEP][0])
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_actor_writes_the_model_output(arch, world, make_guidance, make_observation, perturb):
    model = perturb(make_guidance(arch, world))
    actor = make_deterministic_actor(model)
    assert list(actor.in_keys) == list(keys.OBSERVATION_KEYS) and list(actor.out_keys) == [keys.ACTION]
    td = actor(obs_td(world, make_observation))
    assert td[keys.ACTION].shape == td[keys.PRED].shape and torch.isfinite(td[keys.ACTION]).all()
    torch.testing.assert_close(td[keys.ACTION], direct(model, td))


def test_actor_accepts_trajectory_batches(shapes_world, make_guidance, make_observation, perturb):
    """A stored trajectory has batch [B, T]; per-episode txt/vec may be expanded views (not copies)."""
    model = perturb(make_guidance("mlp", shapes_world))
    steps = [obs_td(shapes_world, make_observation, batch=2, step=i, seed=i) for i in range(3)]
    traj = torch.stack(steps, dim=1)  # [2, 3]
    traj[keys.TXT] = steps[0][keys.TXT][:, None].expand(2, 3, *steps[0][keys.TXT].shape[1:])
    traj[keys.VEC] = steps[0][keys.VEC][:, None].expand(2, 3, -1)
    out = make_deterministic_actor(model)(traj)[keys.ACTION]
    assert out.shape == (2, 3, shapes_world.seq, shapes_world.channels)
    for i, td in enumerate(steps):
        td[keys.TXT], td[keys.VEC] = steps[0][keys.TXT], steps[0][keys.VEC]
        torch.testing.assert_close(out[:, i], direct(model, td))
    value = make_value_network(48, hidden_dim=16, vec_dim=64)(traj)[keys.STATE_VALUE]
    assert value.shape == (2, 3, 1) and torch.isfinite(value).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_one_gaussian_number_per_sample(
    arch, reduction, world, make_guidance, make_observation, perturb
):
    model = perturb(make_guidance(arch, world))
    actor = make_probabilistic_actor(model, std=0.3, log_prob_reduction=reduction)
    td = actor(obs_td(world, make_observation))
    action, loc, lp = td[keys.ACTION], td[keys.LOC], td[keys.LOG_PROB]
    assert actor[-1].log_prob_key == keys.LOG_PROB == "action_log_prob"
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    assert td[keys.SCALE].shape == (3, 1, 1)
    torch.testing.assert_close(loc, direct(model, td))
    elementwise = Normal(loc.double(), 0.3).log_prob(action.double())
    expected = elementwise.sum((-2, -1)) if reduction == "sum" else elementwise.mean((-2, -1))
    torch.testing.assert_close(lp.double(), expected, rtol=1e-5, atol=1e-4)
    # Sampling happened: the action is loc plus noise of the right size.
    assert abs((action - loc).std().item() - 0.3) < 0.03
    dist = actor.get_dist(td)
    assert isinstance(dist, ReducedNormal) and dist.batch_shape == (3,) and dist.entropy().shape == (3,)
    torch.testing.assert_close(dist.log_prob(action), lp)


def test_deterministic_exploration_returns_the_mean(shapes_world, make_guidance, make_observation, perturb):
    actor = make_probabilistic_actor(perturb(make_guidance("mlp", shapes_world)), std=0.5)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        td = actor(obs_td(shapes_world, make_observation))
    assert torch.equal(td[keys.ACTION], td[keys.LOC])
    td = actor(obs_td(shapes_world, make_observation))  # default: sample
    assert not torch.equal(td[keys.ACTION], td[keys.LOC])


def test_learned_std_is_a_trained_parameter(shapes_world, make_guidance, make_observation):
    actor = make_probabilistic_actor(make_guidance("mlp", shapes_world), std=0.2, learn_std=True)
    log_std = [p for n, p in actor.named_parameters() if n.endswith("log_std")]
    assert len(log_std) == 1 and math.isclose(log_std[0].item(), math.log(0.2), rel_tol=1e-6)
    td = actor(obs_td(shapes_world, make_observation))
    torch.testing.assert_close(td[keys.SCALE], torch.full((3, 1, 1), 0.2))
    actor.get_dist(td).log_prob(td[keys.ACTION]).sum().backward()
    assert log_std[0].grad is not None and log_std[0].grad.abs() > 0


def test_sde_std_comes_from_the_observation(shapes_world, make_guidance, make_observation):
    actor = make_probabilistic_actor(make_guidance("mlp", shapes_world), use_sde_std=True)
    assert keys.SDE_STD in actor.in_keys
    td = obs_td(shapes_world, make_observation)
    td[keys.SDE_STD] = torch.tensor([[0.1], [0.2], [0.3]])
    out = actor(td)
    torch.testing.assert_close(out[keys.SCALE], torch.tensor([0.1, 0.2, 0.3]).reshape(3, 1, 1))
    # 0 is a step outside the env's sde_window: the action is the mean and adds nothing to the log-prob.
    td[keys.SDE_STD] = torch.tensor([[0.0], [0.2], [0.0]])
    out = actor(td)
    assert torch.equal(out[keys.ACTION][0], out[keys.LOC][0]) and torch.equal(out[keys.ACTION][2], out[keys.LOC][2])
    assert not torch.equal(out[keys.ACTION][1], out[keys.LOC][1])
    log_prob = actor.get_dist(out).log_prob(out[keys.ACTION])
    assert log_prob[0] == 0 and log_prob[2] == 0 and log_prob[1] != 0
    td[keys.SDE_STD] = torch.tensor([[0.1], [-0.2], [0.3]])
    with pytest.raises(ValueError, match="sde_std must be >= 0, got -0.2"):
        actor(td)


def test_bad_actor_arguments(shapes_world, make_guidance):
    model = make_guidance("mlp", shapes_world)
    with pytest.raises(ValueError, match="exclusive"):
        make_probabilistic_actor(model, learn_std=True, use_sde_std=True)
    with pytest.raises(ValueError, match="log_prob_reduction must be 'mean' or 'sum', got 'max'"):
        make_probabilistic_actor(model, log_prob_reduction="max")
    with pytest.raises(ValueError, match="std must be a positive finite number, got 0.0"):
        make_probabilistic_actor(model, std=0.0)


@pytest.mark.parametrize("step", [0, 4, 9])
def test_sde_std_policy_reproduces_the_sde_step_log_prob(
    step, shapes_world, make_guidance, make_observation, perturb
):
    """With std = sde_action_std, the action's summed log-prob is the SDE step's plus the Jacobian term.

    The env's SDE step is deterministic given the action: x' = sde_mean(img, pred + g a). Under
    a ~ N(loc, s), x' ~ N(sde_mean(img, pred + g loc), sde_step_std) exactly; the densities differ by
    log|k| per element, k = d x' / d a.
    """
    eta, g = 0.7, 1.5
    schedule = get_schedule(10, shapes_world.seq)
    t_curr, t_prev = schedule[step], schedule[step + 1]
    s = sde_action_std(t_curr, t_prev, eta, g)
    model = perturb(make_guidance("mlp", shapes_world), std=0.05)
    actor = make_probabilistic_actor(model, std=s, log_prob_reduction="sum")
    td = actor(obs_td(shapes_world, make_observation, step=step))
    img, pred = td[keys.IMG].double(), td[keys.PRED].double()
    action, loc = td[keys.ACTION].double(), td[keys.LOC].double()

    x_next = sde_mean(img, pred + g * action, t_curr, t_prev, eta)  # the env's deterministic step
    sde = sde_step(img, pred + g * loc, t_curr, t_prev, eta, sample=x_next)
    num_elements = shapes_world.seq * shapes_world.channels
    offset = sde_log_prob_offset(t_curr, t_prev, eta, num_elements, g)
    torch.testing.assert_close(
        td[keys.LOG_PROB].double(), sde.log_prob.sum((-2, -1)) + offset, rtol=1e-5, atol=1e-3
    )
    # The sample is the SDE step's sample for the matching standard noise.
    k = sde_action_coefficient(t_curr, t_prev, eta, g)
    noise = math.copysign(1.0, k) * (action - loc) / s
    replay = sde_step(img, pred + g * loc, t_curr, t_prev, eta, noise=noise)
    torch.testing.assert_close(replay.sample, x_next)
    assert math.isclose(replay.std.item(), abs(k) * s, rel_tol=1e-9)
    # With the mean reduction the log-prob is the same sum divided by seq * C.
    mean_actor = make_probabilistic_actor(model, std=s, log_prob_reduction="mean")
    torch.testing.assert_close(
        mean_actor.get_dist(td).log_prob(td[keys.ACTION]), td[keys.LOG_PROB] / num_elements
    )


def test_sde_action_coefficient_matches_sde_mean(shapes_world):
    t_curr, t_prev, eta, g = 0.8, 0.7, 0.9, 2.0
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    a = torch.randn_like(x)
    k = sde_action_coefficient(t_curr, t_prev, eta, g)
    moved = sde_mean(x, v + g * a, t_curr, t_prev, eta) - sde_mean(x, v, t_curr, t_prev, eta)
    torch.testing.assert_close(moved, k * a)
    assert k < 0  # dt < 0: a positive correction moves the latent down
    # Without noise, k is the Euler step's dt times the guidance scale.
    assert math.isclose(sde_action_coefficient(t_curr, t_prev, 0.0, g), g * (t_prev - t_curr))


def test_clip_ppo_loss_runs_on_the_actor_and_critic(shapes_world, make_guidance, make_observation, perturb):
    """TorchRL's ClipPPOLoss accepts the actor (ratio exactly 1 on fresh samples) and the critic."""
    actor = make_probabilistic_actor(perturb(make_guidance("mlp", shapes_world), std=0.05), std=0.1)
    critic = make_value_network(48, hidden_dim=16, vec_dim=64)
    td = actor(obs_td(shapes_world, make_observation)).detach()
    td["advantage"] = torch.tensor([[1.0], [-0.5], [0.2]])
    td["value_target"] = torch.zeros(3, 1)
    loss = ClipPPOLoss(actor, critic, clip_epsilon=0.2)
    out = loss(td)
    assert out["clip_fraction"].item() == 0
    torch.testing.assert_close(out["ESS"], torch.tensor(1.0))
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    assert torch.isfinite(total)
    total.backward()
    out_layer = actor.module[0].module.net.model.out.weight
    assert out_layer.grad is not None and out_layer.grad.abs().sum() > 0


def test_value_network(world, make_observation):
    critic = make_value_network(world.channels, hidden_dim=16, num_layers=2, vec_dim=world.vec_dim)
    td = critic(obs_td(world, make_observation))
    assert td[keys.STATE_VALUE].shape == (3, 1) and torch.isfinite(td[keys.STATE_VALUE]).all()


def test_reduced_normal_matches_torch_normal_and_kl():
    loc, scale = torch.randn(4, 5, 6), torch.rand(4, 1, 1) + 0.1
    loc2, scale2 = torch.randn(4, 5, 6), torch.rand(4, 1, 1) + 0.1
    p, q = ReducedNormal(loc, scale, "sum"), ReducedNormal(loc2, scale2, "sum")
    x = p.sample()
    assert x.shape == (4, 5, 6) and p.batch_shape == (4,) and p.event_shape == (5, 6)
    ref_p, ref_q = Normal(loc, scale.expand_as(loc)), Normal(loc2, scale2.expand_as(loc2))
    torch.testing.assert_close(p.log_prob(x), ref_p.log_prob(x).sum((-2, -1)))
    torch.testing.assert_close(p.entropy(), ref_p.entropy().sum((-2, -1)))
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(ref_p, ref_q).sum((-2, -1)))
    pm = ReducedNormal(loc, scale, "mean")
    torch.testing.assert_close(pm.log_prob(x), ref_p.log_prob(x).mean((-2, -1)))
    with pytest.raises(ValueError, match="same reduction"):
        kl_divergence(pm, q)
