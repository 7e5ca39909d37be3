"""Issue 27: everything that can be checked before compute is checked before compute.

- Prompts the backbone cannot render (outside the shapes world's grammar, too long) are refused at start by every
  script and algorithm, before any model forward, with a :class:`~fluxguide.backbones.base.PromptError` naming
  the prompt, the flag and file it came from, and the fix: reward gradient, Adjoint Matching and
  ``collect_data.py`` trained on them silently before (only the env checked), and held-out prompts were found
  only when the first evaluation sampled them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fluxguide.algos import AdjointMatching, AdjointMatchingConfig, RewardGradient, RewardGradientConfig
from fluxguide.backbones.prompt_check import PromptError
from fluxguide.errors import UserError
from fluxguide.harness.cli import cli
from fluxguide.policies.registry import build_policy
from fluxguide.rewards import make_reward
from fluxguide.worlds.shapes.world import ShapesWorld, random_world

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--backbone", "shapes-random", "--batch-size", "2", "--num-steps", "2", "--hidden-dim", "8",
         "--num-heads", "2", "--num-layers", "1", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1",
         "--grid-prompts", "2", "--wandb-mode", "disabled", "--total-updates", "1"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model ran before the bad prompts were refused")


@pytest.fixture
def no_model_forward(monkeypatch) -> None:
    """Any shapes world's text encoder or transformer running fails the test."""
    monkeypatch.setattr(ShapesWorld, "encode", fail_if_called)
    monkeypatch.setattr(ShapesWorld, "forward", fail_if_called)


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return random_world(seed=0)


@pytest.fixture
def bad_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na purple dog\n")
    return path


# ------------------------------------------------------------------------------------------ the algorithms
@pytest.mark.parametrize("algo", ["reward-gradient", "adjoint-matching"])
def test_the_algorithms_refuse_prompts_the_backbone_cannot_encode(world: ShapesWorld, algo: str, monkeypatch) -> None:
    policy = build_policy("mlp", world, hidden_dim=8, num_layers=1)
    optimizer = torch.optim.Adam(policy.parameters(), 1e-3)
    reward = make_reward("shapes-clip", world=world)
    if algo == "reward-gradient":
        trainer = RewardGradient(world, policy, reward, optimizer, RewardGradientConfig(num_steps=2))
    else:
        trainer = AdjointMatching(world, policy, reward, optimizer, AdjointMatchingConfig(num_steps=2))
    monkeypatch.setattr(world, "encode", fail_if_called)
    with pytest.raises(PromptError, match=r"(?s)outside the shapes world's grammar: prompt 1: 'a purple dog'"):
        trainer.update(["a red circle", "a purple dog"], torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("name", ["train_reward_gradient", "train_adjoint_matching"])
@pytest.mark.parametrize("flag", ["--train-prompts", "--eval-prompts"])
def test_training_scripts_refuse_bad_prompts_before_any_model_runs(name: str, flag: str, bad_prompts: Path,
                                                                   tmp_path: Path, no_model_forward, capsys) -> None:
    script = load_script(name)
    args = SMALL + ["--run-dir", str(tmp_path / "run"), flag, str(bad_prompts)]
    with pytest.raises(SystemExit) as info:
        cli(script.main, script.Config, args=args)
    message = capsys.readouterr().err
    assert info.value.code == 2, message
    assert message.startswith(f"error: {flag} {bad_prompts}: ") and message.count("\n") == 1, message
    for part in ("'a purple dog'", "grammar", f"remove or rewrite them in {bad_prompts}"):
        assert part in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_collect_data_refuses_bad_prompts_before_any_model_runs(bad_prompts: Path, tmp_path: Path,
                                                                no_model_forward) -> None:
    script = load_script("collect_data")
    args = ["--backbone", "shapes-random", "--num-steps", "2", "--episodes", "2", "--batch-size", "2",
            "--wandb-mode", "disabled", "--out-dir", str(tmp_path / "data"), "--train-prompts", str(bad_prompts)]
    import tyro

    with pytest.raises(PromptError, match=rf"(?s)--train-prompts {bad_prompts}: .*'a purple dog'"):
        script.main(tyro.cli(script.Config, args=args))
    assert not list((tmp_path / "data").glob("chunk*"))


def test_evaluate_refuses_bad_prompts_before_sampling(bad_prompts: Path, tmp_path: Path, no_model_forward) -> None:
    script = load_script("evaluate")
    import tyro

    cfg = tyro.cli(script.Config, args=["--backbone", "shapes-random", "--num-steps", "2", "--best-of", "2",
                                        "--out-dir", str(tmp_path / "out"), "--prompts", str(bad_prompts)])
    with pytest.raises(PromptError, match=rf"(?s)--prompts {bad_prompts}: .*'a purple dog'"):
        script.main(cfg)


def test_the_env_and_sampling_use_the_same_check(world: ShapesWorld) -> None:
    from fluxguide.envs import GuidanceCore

    with pytest.raises(PromptError, match=r"(?s)'a purple dog'.*ShapesWorld cannot render these prompts"):
        GuidanceCore(world, reward=lambda im, p: torch.zeros(len(p)), prompts=["a red circle", "a purple dog"])
    with pytest.raises(PromptError, match="'a purple dog'"):
        world.sample(["a purple dog"], num_steps=2)
    assert issubclass(PromptError, UserError) and issubclass(PromptError, ValueError)
