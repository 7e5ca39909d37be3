"""Step-specific, timestep-range and multi-objective guidance."""

from __future__ import annotations

import pytest
import torch

from fluxguide.policies import (
    MLPGuidanceModel,
    MultiObjectiveGuidance,
    StepSpecificGuidance,
    TimestepRangeGuidance,
    build_guidance_model,
)


def mlp(seed: int, perturb, world) -> MLPGuidanceModel:
    model = MLPGuidanceModel(
        latent_channels=world.channels, hidden_dim=16, num_layers=2, vec_dim=world.vec_dim
    )
    return perturb(model, seed=seed)


def run(model, obs, t, step):
    return model(obs["img"], obs["pred"], obs["txt"], obs["vec"], t, step)


def test_step_specific_routes_int_steps(shapes_world, make_observation, perturb):
    early, late = mlp(1, perturb, shapes_world), mlp(2, perturb, shapes_world)
    guidance = StepSpecificGuidance({(0, 3): early, (3, 6): late})
    obs = make_observation(shapes_world)
    t = obs["t"]
    assert torch.equal(run(guidance, obs, t, 0), run(early, obs, t, 0))
    assert torch.equal(run(guidance, obs, t, 2), run(early, obs, t, 2))
    assert torch.equal(run(guidance, obs, t, 3), run(late, obs, t, 3))
    assert torch.equal(run(guidance, obs, t, 6), torch.zeros_like(obs["pred"]))  # not covered
    assert not torch.equal(run(early, obs, t, 0), run(late, obs, t, 0))


def test_step_specific_routes_per_sample_steps(shapes_world, make_observation, perturb):
    early, late = mlp(1, perturb, shapes_world), mlp(2, perturb, shapes_world)
    guidance = StepSpecificGuidance({(0, 3): early, (3, 6): late})
    obs = make_observation(shapes_world)
    steps = torch.tensor([1, 4, 9])
    out = run(guidance, obs, obs["t"], steps)
    expected = torch.stack(
        [run(early, obs, obs["t"], 1)[0], run(late, obs, obs["t"], 4)[1], torch.zeros_like(obs["pred"][2])]
    )
    torch.testing.assert_close(out, expected)
    same = run(guidance, obs, obs["t"], torch.tensor([4, 4, 4]))
    assert torch.equal(same, run(late, obs, obs["t"], 4))


def test_step_ranges_must_not_overlap(shapes_world, perturb):
    with pytest.raises(ValueError, match=r"step ranges \(0, 5\) and \(3, 8\) overlap"):
        StepSpecificGuidance({(0, 5): mlp(1, perturb, shapes_world), (3, 8): mlp(2, perturb, shapes_world)})
    with pytest.raises(ValueError, match=r"must satisfy 0 <= start < end"):
        StepSpecificGuidance({(4, 4): mlp(1, perturb, shapes_world)})


def test_timestep_ranges_route_by_t_first_match_wins(shapes_world, make_observation, perturb):
    early, late = mlp(1, perturb, shapes_world), mlp(2, perturb, shapes_world)
    guidance = TimestepRangeGuidance([((0.5, 1.0), early), ((0.2, 0.5), late)])
    obs = make_observation(shapes_world)
    t = torch.tensor([1.0, 0.5, 0.3])
    out = run(guidance, obs, t, 0)
    torch.testing.assert_close(out[:2], run(early, obs, t, 0)[:2])  # t = 0.5 goes to the first listed
    torch.testing.assert_close(out[2], run(late, obs, t, 0)[2])
    uncovered = run(guidance, obs, torch.full((3,), 0.1), 0)
    assert torch.equal(uncovered, torch.zeros_like(uncovered))
    with pytest.raises(ValueError, match=r"time range \(0.8, 0.2\)"):
        TimestepRangeGuidance([((0.8, 0.2), early)])


def test_multi_objective_is_the_weighted_sum(shapes_world, make_observation, perturb):
    a, b = mlp(1, perturb, shapes_world), mlp(2, perturb, shapes_world)
    guidance = MultiObjectiveGuidance([a, b], weights=[0.7, -0.2])
    obs = make_observation(shapes_world)
    expected = 0.7 * run(a, obs, obs["t"], 0) - 0.2 * run(b, obs, obs["t"], 0)
    torch.testing.assert_close(run(guidance, obs, obs["t"], 0), expected)
    with pytest.raises(ValueError, match="2 models but 1 weights"):
        MultiObjectiveGuidance([a, b], weights=[1.0])


def test_composites_rebuild_from_config(shapes_world, make_observation, perturb):
    a, b = mlp(1, perturb, shapes_world), mlp(2, perturb, shapes_world)
    obs = make_observation(shapes_world)
    for guidance in (
        StepSpecificGuidance({(0, 3): a, (3, 6): b}),
        TimestepRangeGuidance([((0.5, 1.0), a), ((0.0, 0.5), b)]),
        MultiObjectiveGuidance([StepSpecificGuidance({(0, 3): a}), b], weights=[0.5, 2.0]),
    ):
        rebuilt = build_guidance_model(guidance.config)
        rebuilt.load_state_dict(guidance.state_dict())
        assert rebuilt.config == guidance.config
        for step in (1, 4):
            assert torch.equal(run(rebuilt, obs, obs["t"], step), run(guidance, obs, obs["t"], step))


def test_fresh_composites_output_zero(shapes_world, make_observation):
    fresh = MLPGuidanceModel(latent_channels=48, hidden_dim=16, vec_dim=64)
    obs = make_observation(shapes_world)
    for guidance in (
        StepSpecificGuidance({(0, 2): fresh}),
        TimestepRangeGuidance([((0.0, 1.0), fresh)]),
        MultiObjectiveGuidance([fresh, fresh], [1.0, 3.0]),
    ):
        out = run(guidance, obs, obs["t"], 1)
        assert torch.equal(out, torch.zeros_like(out))
