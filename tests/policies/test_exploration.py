"""make_ppo_actor: the one place that decides which space PPO explores, its std and where exploration starts."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from fluxguide import keys
from fluxguide.policies import (
    CoarseNormal,
    Exploration,
    ReducedNormal,
    SubspaceNormal,
    make_coefficient_actor,
    make_ppo_actor,
    make_probabilistic_actor,
)
from fluxguide.policies.exploration import COEFFICIENT_STD, CORRECTION_STD
from fluxguide.policies.registry import build_policy


def narrow_policy(backbone, name, **kwargs):
    return build_policy(name, backbone, hidden_dim=8, num_layers=1, num_heads=2, **kwargs)


def test_an_affine_policy_explores_its_coefficients_in_ode_mode(backbone):
    actor, exploration = make_ppo_actor(narrow_policy(backbone, "affine", min_t=0.5), backbone)
    assert exploration == Exploration("coefficients", COEFFICIENT_STD, False, 0.0)
    assert actor.module[-1].distribution_class is SubspaceNormal
    assert str(exploration) == "explores the coefficients with std 1"


@pytest.mark.parametrize(("kwargs", "expected", "distribution"), [
    ({"mode": "sde"}, Exploration("correction", None, False, 0.0), ReducedNormal),
    ({"mode": "sde", "learn_std": True, "explore_min_t": 0.5}, Exploration("correction", None, False, 0.0),
     ReducedNormal),
    ({"explore_coefficients": False, "explore_min_t": 0.5}, Exploration("correction", CORRECTION_STD, False, 0.5),
     ReducedNormal),
    ({"coarse": True, "std": 0.3, "learn_std": True}, Exploration("coarse correction", 0.3, True, 0.0), CoarseNormal),
])
def test_other_settings_explore_the_correction(backbone, kwargs, expected, distribution):
    actor, exploration = make_ppo_actor(narrow_policy(backbone, "affine"), backbone, **kwargs)
    assert exploration == expected and actor.module[-1].distribution_class is distribution


def test_a_network_explores_its_correction(backbone):
    _, exploration = make_ppo_actor(narrow_policy(backbone, "mlp"), backbone)
    assert exploration == Exploration("correction", CORRECTION_STD, False, 0.0)


def test_unknown_mode_is_refused(backbone):
    with pytest.raises(ValueError, match="mode must be 'sde' or 'ode'"):
        make_ppo_actor(narrow_policy(backbone, "mlp"), backbone, mode="euler")


@pytest.mark.parametrize("case", ["coefficients", "ode", "sde"])
def test_same_actor_as_the_direct_builders(backbone, case):
    """What make_ppo_actor builds samples and scores exactly as the builder it picks, called directly."""
    policy = narrow_policy(backbone, "affine" if case == "coefficients" else "attention", min_t=0.5)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    if case == "coefficients":
        direct = make_coefficient_actor(policy, std=1.0)
    else:
        direct = make_probabilistic_actor(policy, std=0.1, use_sde_std=case == "sde",
                                          explore_min_t=0.5 if case == "ode" else 0.0)
    actor, _ = make_ppo_actor(policy, backbone, mode="sde" if case == "sde" else "ode", explore_min_t=0.5)
    cond = backbone.encode(["a red bar", "a blue circle"])
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, backbone.latent_seq, backbone.latent_channels, generator=g)
    td = TensorDict({keys.IMG: img, keys.PRED: torch.randn(img.shape, generator=g), keys.TXT: cond.txt,
                     keys.VEC: cond.vec, keys.T: torch.tensor([[0.8], [0.3]]), keys.STEP: torch.ones(2, 1),
                     keys.SDE_STD: torch.full((2, 1), 0.2)}, [2])
    outs = []
    for a in (direct, actor):
        torch.manual_seed(3)
        outs.append(a(td.clone()))
    for key in (keys.ACTION, keys.LOG_PROB):
        assert torch.equal(outs[0][key], outs[1][key])
