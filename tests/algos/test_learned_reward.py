"""Reward gradient through a learned reward (fluxguide.algos.learned_reward): a black box that refuses backward."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fluxguide.algos.learned_reward import LearnedRewardGradient, SurrogateFitConfig
from fluxguide.algos.registry import get_algorithm
from fluxguide.algos.reward_gradient import RewardGradientConfig
from fluxguide.policies.registry import build_policy
from fluxguide.rewards.learned import LearnedReward
from tests.black_box import black_box

PROMPTS = ["a red circle", "a yellow triangle above a red bar"]


def build_algorithm(world, steps: int = 3, fit_steps: int = 4, warmup: int = 0, ramp: int = 0) -> LearnedRewardGradient:
    torch.manual_seed(0)
    policy = build_policy("affine", world, hidden_dim=8)
    surrogate = LearnedReward(world.build_reward("shapes-clip"), hidden=16, capacity=8)
    return LearnedRewardGradient(
        world, policy, black_box, surrogate, torch.optim.Adam(policy.parameters(), 1e-2),
        RewardGradientConfig(num_steps=steps, reward_shift=1),
        surrogate_optimizer=torch.optim.Adam(surrogate.head.parameters(), 1e-3),
        fit=SurrogateFitConfig(fit_steps, 4, warmup, ramp))


def test_trains_on_a_reward_that_refuses_backward_and_logs_its_scores(shapes_random) -> None:
    algo = build_algorithm(shapes_random)
    gen = torch.Generator().manual_seed(0)
    first = algo.update(PROMPTS, gen)
    # the head starts at zero: its prediction of the first images was constant (no correlation, error = their rms)
    assert first["surrogate_size"] == 2 and first["surrogate_corr"] == 0.0
    assert first["surrogate_rmse"] >= first["reward_mean"] > 0
    metrics = algo.update(PROMPTS, gen)
    assert metrics["surrogate_size"] == 4 and math.isfinite(metrics["loss_reward"]) and metrics["grad_norm"] > 0
    assert metrics["surrogate_mean"] != 0.0 and math.isfinite(metrics["surrogate_rmse"])
    # reward_mean is the black box's score of the update's images, not the surrogate's
    assert 0.0 < metrics["reward_mean"] < 1.0 and metrics["reward_mean"] != metrics["surrogate_mean"]
    assert set(algo.modules) == {"policy", "reward_head", "reward_memory"} and "reward_head" in algo.optimizers
    spec = get_algorithm("learned-reward-gradient")
    assert spec.algorithm is LearnedRewardGradient and spec.reward == "black-box"


def test_an_update_embeds_its_images_once(shapes_random) -> None:
    """The memory keeps the embeddings the head then scores with their graph: one pass of the CLIP's image
    tower per update (not one to remember and one to score)."""
    algo = build_algorithm(shapes_random)
    calls = []
    algo.surrogate.clip.model.visual.register_forward_hook(lambda *args: calls.append(1))
    metrics = algo.update(PROMPTS, torch.Generator().manual_seed(0))
    assert len(calls) == 1 and metrics["surrogate_size"] == 2


def test_the_warm_up_scores_and_fits_without_touching_the_policy(shapes_random) -> None:
    """warmup=4 with 2 prompts per update: the first two updates fill the memory and fit the head, and leave the
    policy as built; the third steps it, at a quarter of its learning rate (ramp=8: 2 of 8 images), the sixth at
    all of it."""
    algo = build_algorithm(shapes_random, warmup=4, ramp=8)
    start = {k: v.clone() for k, v in algo.policy.state_dict().items()}
    head = [p.clone() for p in algo.surrogate.head.parameters()]
    gen = torch.Generator().manual_seed(2)
    warm = [algo.update(PROMPTS, gen) for _ in range(2)]
    assert [m["surrogate_size"] for m in warm] == [2, 4] and all(m["grad_norm"] == 0.0 for m in warm)
    assert all(0.0 < m["reward_mean"] < 1.0 for m in warm)
    assert all(torch.equal(v, start[k]) for k, v in algo.policy.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(head, algo.surrogate.head.parameters())), "the head was fitted"
    trained = algo.update(PROMPTS, gen)
    assert trained["surrogate_size"] == 6 and trained["grad_norm"] > 0
    assert any(not torch.equal(v, start[k]) for k, v in algo.policy.state_dict().items())
    assert [m["lr_factor"] for m in warm] == [0.0, 0.0] and trained["lr_factor"] == 0.25
    assert algo.optimizers["policy"].param_groups[0]["lr"] == 0.25 * 1e-2
    assert [algo.update(PROMPTS, gen)["lr_factor"] for _ in range(4)] == [0.5, 0.75, 1.0, 1.0]


def test_a_resumed_run_continues_exactly(shapes_random) -> None:
    """The head, its memory and both optimizers are the state: restoring them after two updates gives the third
    update of the uninterrupted run, to the bit."""
    straight = build_algorithm(shapes_random)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        straight.update(PROMPTS, gen)
    state = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in straight.modules.items()}
    opt_state = copy.deepcopy({name: o.state_dict() for name, o in straight.optimizers.items()})
    gen_state = gen.get_state()
    expected = straight.update(PROMPTS, gen)

    resumed = build_algorithm(shapes_random)
    for name, module in resumed.modules.items():
        module.load_state_dict(state[name])
    for name, optimizer in resumed.optimizers.items():
        optimizer.load_state_dict(opt_state[name])
    got = resumed.update(PROMPTS, torch.Generator().set_state(gen_state))
    assert got == expected


def test_refuses_bad_fit_settings() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        SurrogateFitConfig(steps=1, batch_size=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        SurrogateFitConfig(warmup=-1)
    with pytest.raises(ValueError, match="ramp=-1"):
        SurrogateFitConfig(ramp=-1)
