"""Few-step distillation targets (fluxguide/data/coarse.py): one coarse Euler step with its target lands where the
teacher's fine steps land, and a rollout from the teacher's own state reproduces the free targets."""

from __future__ import annotations

import pytest
import torch

from fluxguide import keys
from fluxguide.data.coarse import coarsen, relabel_coarse, substeps
from fluxguide.data.collector import GuidanceDataCollector
from fluxguide.data.episodes import EPISODE, TARGET
from fluxguide.data.targets import CFGDistillation, PolicyDistillation
from fluxguide.data.teachers import CFGTeacher
from fluxguide.policies.registry import build_policy
from fluxguide.sampling.instrumented import PRED_USED, T_PREV, denoise_with_state_collection
from fluxguide.worlds.shapes import ShapesWorld

PROMPTS = ["a red circle", "a blue bar", "a green triangle above a yellow circle"]


def teacher_trajectory(world: ShapesWorld, fine_steps: int):
    """CFG 3's trajectory at ``fine_steps`` from fixed noise: (final latent, states, conditioning, schedule)."""
    cond = world.encode(PROMPTS)
    times = world.schedule(fine_steps)
    noise = world.noise(len(PROMPTS), torch.Generator().manual_seed(0))
    final, states = denoise_with_state_collection(world, noise, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, times,
                                                  guidance=world.default_guidance,
                                                  guidance_model=CFGTeacher.from_backbone(world, 3.0))
    return final, states, cond, times


@pytest.mark.parametrize("coarse_steps", [1, 2, 4])
def test_one_coarse_step_lands_where_the_teachers_fine_steps_land(shapes_random: ShapesWorld, coarse_steps: int) -> None:
    final, states, _, times = teacher_trajectory(shapes_random, 8 if coarse_steps != 1 else 4)
    coarse, targets = coarsen(states, states[PRED_USED] - states[keys.PRED], coarse_steps)
    assert coarse[keys.IMG].shape[1] == coarse_steps and targets.shape == coarse[keys.PRED].shape
    m = (len(times) - 1) // coarse_steps
    assert coarse[keys.T][0].tolist() == pytest.approx(times[:-1:m], abs=1e-6)
    assert coarse[T_PREV][0].tolist() == pytest.approx(times[m::m], abs=1e-6)
    assert coarse[keys.STEP][0].tolist() == list(range(coarse_steps))
    # the student's Euler step from the teacher's state, with the target as its correction
    x, t, t_next = coarse[keys.IMG], coarse[keys.T][..., None, None], coarse[T_PREV][..., None, None]
    landed = x + (t_next - t) * (coarse[keys.PRED] + targets)
    ends = torch.cat([x[:, 1:], final[:, None]], dim=1)  # the next coarse state; the last lands on the final latent
    # float32 sums of m steps of size ~1 in another order: a few ulps of the latent scale (~4)
    torch.testing.assert_close(landed, ends, atol=1e-5, rtol=1e-5)


def test_coarsening_to_the_collected_steps_changes_nothing(shapes_random: ShapesWorld) -> None:
    _, states, _, _ = teacher_trajectory(shapes_random, 4)
    fine_targets = states[PRED_USED] - states[keys.PRED]
    coarse, targets = coarsen(states, fine_targets, 4)
    torch.testing.assert_close(targets, fine_targets, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(coarse[keys.IMG], states[keys.IMG])


def test_a_rollout_from_the_teachers_own_states_gives_its_targets(shapes_random: ShapesWorld) -> None:
    """relabel_coarse under the trajectory's own prompts re-runs CFG over each interval: the same targets that
    coarsen read off the trajectory for free (what swapped prompts get under theirs)."""
    _, states, cond, times = teacher_trajectory(shapes_random, 8)
    coarse, targets = coarsen(states, states[PRED_USED] - states[keys.PRED], 2)
    relabelled, rolled = relabel_coarse(shapes_random, coarse, cond, CFGTeacher.from_backbone(shapes_random, 3.0),
                                        times)
    torch.testing.assert_close(rolled, targets, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(relabelled[keys.PRED], coarse[keys.PRED], atol=1e-5, rtol=1e-5)


def test_the_coarse_steps_must_divide_the_teachers() -> None:
    assert substeps(20, 4) == 5
    with pytest.raises(ValueError, match="not a multiple of coarse_steps=8.*e.g. 24 steps"):
        substeps(20, 8)
    with pytest.raises(ValueError, match="integer >= 1"):
        CFGDistillation(3.0, coarse_steps=0)


def test_a_coarse_collection_records_the_students_steps(shapes_random: ShapesWorld) -> None:
    strategy = CFGDistillation(3.0, prompt_swaps=1, coarse_steps=2)
    collector = GuidanceDataCollector(shapes_random, strategy, num_steps=4)
    meta = collector.metadata()
    assert (meta["num_steps"], meta["collected_steps"], meta["coarse_steps"]) == (2, 4, 2)
    chunk = collector.collect(PROMPTS)
    assert chunk.num_episodes == 2 * len(PROMPTS)  # the sampled prompts and one swap each
    assert chunk.transitions[keys.STEP].tolist() == [0, 1] * (2 * len(PROMPTS))
    with pytest.raises(ValueError, match="student"):
        CFGDistillation(3.0, student=CFGTeacher.from_backbone(shapes_random, 3.0), coarse_steps=2)


def test_collect_data_refuses_coarse_steps_it_cannot_distil(tmp_path) -> None:
    from fluxguide.harness.config import ConfigError, validate
    from tests.scripts import load_script

    collect = load_script("collect_data")
    with pytest.raises(ConfigError, match=r"--num-steps 20 / --coarse-steps 8: .*e\.g\. 24 steps"):
        validate(collect.Config(out_dir=tmp_path / "d", coarse_steps=8))
    with pytest.raises(ConfigError, match="--coarse-steps distils a teacher's displacements.*drop --coarse-steps"):
        validate(collect.Config(out_dir=tmp_path / "d", coarse_steps=4, strategy="best-of-n"))
    with pytest.raises(ConfigError, match="policy-distillation distils the policy --teacher: give both or neither"):
        validate(collect.Config(out_dir=tmp_path / "d", strategy="policy-distillation"))
    with pytest.raises(ConfigError, match="give both or neither"):
        validate(collect.Config(out_dir=tmp_path / "d", teacher=tmp_path / "t.safetensors"))
    with pytest.raises(ConfigError, match=r"--teacher .*t\.safetensors: no such file"):
        validate(collect.Config(out_dir=tmp_path / "d", strategy="policy-distillation", teacher=tmp_path / "t.safetensors"))


def policy_teacher(world: ShapesWorld) -> torch.nn.Module:
    """A small guidance network with random (non-zero) output: a teacher whose corrections are not CFG's."""
    torch.manual_seed(0)
    net = build_policy("mlp", world, hidden_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_a_policy_teacher_labels_its_own_and_swapped_states_with_its_corrections(shapes_random: ShapesWorld) -> None:
    """Policy distillation at the collected steps: every target, sampled or swapped prompt, is the teacher's output
    at the stored observation."""
    teacher = policy_teacher(shapes_random)
    strategy = PolicyDistillation(teacher, source="runs/teacher/guidance.safetensors", prompt_swaps=1)
    collector = GuidanceDataCollector(shapes_random, strategy, num_steps=4)
    meta = collector.metadata()
    assert (meta["strategy"], meta["teacher"], meta["num_steps"]) == ("policy_distillation",
                                                                      "runs/teacher/guidance.safetensors", 4)
    chunk = collector.collect(PROMPTS)
    assert chunk.num_episodes == 2 * len(PROMPTS)
    tr = chunk.transitions
    ep = chunk.episodes[tr[EPISODE]]
    with torch.no_grad():
        expected = torch.stack([teacher(tr[keys.IMG][i:i + 1], tr[keys.PRED][i:i + 1], ep[keys.TXT][i:i + 1],
                                        ep[keys.VEC][i:i + 1], tr[keys.T][i:i + 1], int(tr[keys.STEP][i]))[0]
                                for i in range(tr.batch_size[0])])
    assert expected.abs().mean() > 1e-3  # a teacher that corrects something
    torch.testing.assert_close(tr[TARGET], expected, atol=1e-5, rtol=1e-4)


def test_a_policy_teacher_distils_into_coarse_steps_that_land_on_its_trajectory(shapes_random: ShapesWorld) -> None:
    """Progressive distillation of a 4-step policy into 2 steps: the student's first Euler step, with its target,
    lands on the teacher's own state two fine steps later."""
    chunk = GuidanceDataCollector(shapes_random, PolicyDistillation(policy_teacher(shapes_random), coarse_steps=2),
                                  num_steps=4).collect(PROMPTS)
    tr = chunk.transitions
    first, second = tr[tr[keys.STEP] == 0], tr[tr[keys.STEP] == 1]
    dt = (first[T_PREV] - first[keys.T])[:, None, None]
    landed = first[keys.IMG] + dt * (first[keys.PRED] + first[TARGET])
    torch.testing.assert_close(landed, second[keys.IMG], atol=1e-5, rtol=1e-5)
    assert second[keys.T].tolist() == pytest.approx(first[T_PREV].tolist())
