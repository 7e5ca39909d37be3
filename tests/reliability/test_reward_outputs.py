"""Issue 27: a reward's output is checked where it enters every algorithm and evaluation. A reward that returns
anything but one finite float per image (the wrong shape, integers, a NaN, an inf) is refused with a
:class:`~fluxguide.rewards.RewardOutputError` (a UserError) naming the reward -- its registry name or spec and
what it is -- instead of training on it (reward gradient's reward target clamps an inf away) or scoring with it.

The rewards here are plain ``nn.Module`` plug-ins, as an installed package may give: nothing of the
:class:`~fluxguide.rewards.RewardModel` contract checks their output, so only the entry points can.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fluxguide.algos import AdjointMatching, AdjointMatchingConfig, RewardGradient, RewardGradientConfig
from fluxguide.data.targets import BestOfN, CollectionBatch
from fluxguide.data.teachers import RewardGradientTeacher
from fluxguide.envs import GuidanceCore
from fluxguide.errors import UserError
from fluxguide.harness.evaluation import SamplerSpec, compare_samplers, evaluate_guidance
from fluxguide.policies.registry import build_policy
from fluxguide.rewards import CallableReward, RewardOutputError, make_reward
from fluxguide.worlds.shapes.world import ShapesWorld
from tests.scripts import load_script, run_script

PROMPTS = ["a red circle", "a blue bar"]
THIS = "tests.reliability.test_reward_outputs"


class Brightness(nn.Module):
    """A differentiable plain-module reward whose output is spoiled as ``mode`` says: ``"inf"`` / ``"nan"`` on
    the first image (``only_with_grad``: only in training calls, so a run's first evaluation passes),
    ``"column"`` ``(B, 1)``, ``"int"`` an integer tensor."""

    def __init__(self, mode: str, only_with_grad: bool = False) -> None:
        super().__init__()
        self.mode, self.only_with_grad = mode, only_with_grad

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = images.mean(dim=(1, 2, 3))
        if self.only_with_grad and not torch.is_grad_enabled():
            return values
        if self.mode in ("inf", "nan"):
            spoil = torch.zeros_like(values)
            spoil[0] = float(self.mode)
            return values + spoil
        if self.mode == "column":
            return values[:, None]
        if self.mode == "int":
            return (values * 100).long()
        return values


def make_inf_when_training(**kwargs: object) -> Brightness:
    """A reward plug-in (named to the scripts by spec) that returns inf on one image of every training batch."""
    return Brightness("inf", only_with_grad=True)


def output_refused(reward: str, what: str) -> pytest.RaisesContext:
    return pytest.raises(RewardOutputError, match=rf"(?s){reward}.*{what}")


# ----------------------------------------------------------------------------------------- the algorithms
def test_an_inf_reward_under_reward_gradient_stops_the_script_at_the_first_update(tmp_path) -> None:
    """The shapes preset's reward target (-0.1) clamps an inf to the target: before, the run trained on."""
    script = load_script("train_reward_gradient")
    argv = ["--backbone", "shapes-random", "--batch-size", "2", "--num-steps", "3", "--eval-num-prompts", "2",
            "--eval-samples-per-prompt", "1", "--grid-prompts", "2", "--wandb-mode", "disabled",
            "--run-dir", str(tmp_path), "--total-updates", "2", "--eval-every", "100",
            "--reward", f"{THIS}:make_inf_when_training"]
    with pytest.raises(SystemExit, match=rf"(?s)stopping at update 1: reward '{THIS}:make_inf_when_training' "
                                         r"\(Brightness\) returned 1 inf value.*image 0.*finite"):
        run_script(script, argv)


def test_reward_gradient_checks_before_the_reward_target_clamps(shapes_random: ShapesWorld) -> None:
    policy = build_policy("mlp", shapes_random, hidden_dim=8, num_layers=1)
    before = [p.detach().clone() for p in policy.parameters()]
    algo = RewardGradient(shapes_random, policy, Brightness("inf"), torch.optim.Adam(policy.parameters(), 1e-2),
                          RewardGradientConfig(num_steps=2, reward_target=0.5))
    with output_refused("Brightness", r"returned 1 inf value"):
        algo.update(PROMPTS, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_adjoint_matching_refuses_a_nan_reward(shapes_random: ShapesWorld) -> None:
    policy = build_policy("mlp", shapes_random, hidden_dim=8, num_layers=1)
    algo = AdjointMatching(shapes_random, policy, Brightness("nan"), torch.optim.Adam(policy.parameters(), 1e-2),
                           AdjointMatchingConfig(num_steps=2))
    with output_refused("Brightness", "returned 1 NaN value"):
        algo.update(PROMPTS, torch.Generator().manual_seed(0))


def test_a_wrong_shape_under_ppo_is_refused_at_the_env(shapes_random: ShapesWorld) -> None:
    """PPO's rewards come from the env: a ``(B, 1)`` output was flattened into place before."""
    from fluxguide.algos.ppo import PPO, PPOConfig
    from fluxguide.envs import GuidanceTorchRLEnv
    from fluxguide.policies import make_probabilistic_actor

    env = GuidanceTorchRLEnv(shapes_random, reward=Brightness("column"), prompts=PROMPTS, batch_size=4,
                             samples_per_prompt=2, num_steps=2, mode="sde")
    env.set_seed(0)
    actor = make_probabilistic_actor(build_policy("mlp", shapes_random, hidden_dim=8, num_layers=1), std=0.2,
                                     use_sde_std=True)
    ppo = PPO(env, actor, torch.optim.Adam(actor.parameters(), 1e-3), PPOConfig(minibatch_trajectories=2, epochs=1))
    with output_refused("Brightness", r"one value per image, shape \(4,\), got shape \(4, 1\)"):
        ppo.update()
    ppo.shutdown()


@pytest.mark.parametrize("mode, what", [("int", "floating-point.*torch.int64"), ("nan", "NaN")])
def test_the_env_faces_refuse_a_bad_reward(shapes_random: ShapesWorld, mode: str, what: str) -> None:
    core = GuidanceCore(shapes_random, reward=Brightness(mode), prompts=PROMPTS, batch_size=2, num_steps=2)
    core.reset(seed=0)
    core.step(torch.zeros(2, *core.latent_shape))
    with output_refused("Brightness", what):
        core.step(torch.zeros(2, *core.latent_shape))


def test_the_collectors_teachers_and_best_of_n_refuse_a_nan_reward(shapes_random: ShapesWorld) -> None:
    teacher = RewardGradientTeacher(Brightness("nan"), shapes_random.decode, prompts=PROMPTS)
    with output_refused("Brightness", "NaN"):
        shapes_random.sample(PROMPTS, num_steps=2, guidance_model=teacher, generator=torch.Generator().manual_seed(0))
    strategy = BestOfN(Brightness("nan"), n=2, noise_level=0.5)
    g = torch.Generator().manual_seed(0)
    batch = CollectionBatch(shapes_random, PROMPTS, shapes_random.noise(2, g), shapes_random.schedule(2), g)
    with output_refused("Brightness", "NaN"):
        strategy.collect(batch)


# ----------------------------------------------------------------------------------------------- evaluation
def test_evaluation_refuses_a_nan_reward_naming_it(shapes_random: ShapesWorld) -> None:
    with output_refused("Brightness", "returned 1 NaN value"):
        evaluate_guidance(shapes_random, Brightness("nan"), None, PROMPTS, samples_per_prompt=1, num_steps=2)
    with output_refused("Brightness", "NaN"):
        compare_samplers(shapes_random, [SamplerSpec("base")], PROMPTS, {"b": Brightness("nan")}, pick_reward="b",
                         samples_per_prompt=1, num_steps=2)


# ----------------------------------------------------------------------------------------------- the contract
def test_a_registered_reward_is_named_by_its_registry_name_or_spec() -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    def boom(x: torch.Tensor, p: list[str]) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)) * math.inf

    reward = make_reward("callable", fn=boom)
    with pytest.raises(RewardOutputError, match=r"reward 'callable' \(reward function 'boom'\) returned 2 inf values"):
        reward(images, PROMPTS)
    error = RewardOutputError("x")
    assert isinstance(error, UserError) and isinstance(error, ValueError)
    with pytest.raises(TypeError, match=r"'as_int' must return floating-point values, got dtype torch.int64"):
        CallableReward(lambda x, p: torch.zeros(len(p), dtype=torch.long), name="as_int")(images, PROMPTS)
