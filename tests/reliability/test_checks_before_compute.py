"""Issue 27: everything that can be checked before compute is checked before compute.

- Prompts the backbone cannot render (outside the shapes world's grammar, too long) are refused at start by every
  script and algorithm, before any model forward, with a :class:`~fluxguide.backbones.prompt_check.PromptError`
  naming the prompt, the flag and file it came from, and the fix: reward gradient, Adjoint Matching and
  ``collect_data.py`` trained on them silently before (only the env checked), and held-out prompts were found
  only when the first evaluation sampled them.
- ``evaluate.py`` loads every policy and checks it against the backbone (sizes; the fingerprint its run
  recorded) before sampling any row.
- A ``--policy`` plug-in that builds a plain ``nn.Module`` is refused when built, not at the first checkpoint.
- A policy file whose config asks for other tensor shapes than its weights is refused before the config's
  network is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file, save_file
from torch import nn

from fluxguide.algos import AdjointMatching, AdjointMatchingConfig, RewardGradient, RewardGradientConfig
from fluxguide.backbones.prompt_check import PromptError
from fluxguide.errors import UserError
from fluxguide.harness.cli import cli
from fluxguide.policies import MLPGuidanceModel, load_guidance_model, save_guidance_model
from fluxguide.policies.checkpoint import CONFIG_METADATA_KEY, GuidanceFileError
from fluxguide.policies.registry import PolicyMismatchError, PolicyPluginError, build_policy
from fluxguide.rewards import make_reward
from fluxguide.worlds.shapes.world import ShapesWorld
from tests.reliability import fail_if_called
from tests.scripts import ONE_UPDATE, load_script


@pytest.fixture
def no_model_forward(monkeypatch) -> None:
    """Any shapes world's text encoder or transformer running fails the test."""
    monkeypatch.setattr(ShapesWorld, "encode", fail_if_called)
    monkeypatch.setattr(ShapesWorld, "forward", fail_if_called)


@pytest.fixture
def bad_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na purple dog\n")
    return path


# ------------------------------------------------------------------------------------------ the algorithms
@pytest.mark.parametrize("algo", ["reward-gradient", "adjoint-matching"])
def test_the_algorithms_refuse_prompts_the_backbone_cannot_encode(shapes_random: ShapesWorld, algo: str,
                                                                   monkeypatch) -> None:
    policy = build_policy("mlp", shapes_random, hidden_dim=8, num_layers=1)
    optimizer = torch.optim.Adam(policy.parameters(), 1e-3)
    reward = make_reward("shapes-clip", world=shapes_random)
    if algo == "reward-gradient":
        trainer = RewardGradient(shapes_random, policy, reward, optimizer, RewardGradientConfig(num_steps=2))
    else:
        trainer = AdjointMatching(shapes_random, policy, reward, optimizer, AdjointMatchingConfig(num_steps=2))
    monkeypatch.setattr(shapes_random, "encode", fail_if_called)
    with pytest.raises(PromptError, match=r"(?s)outside the shapes world's grammar: prompt 1: 'a purple dog'"):
        trainer.update(["a red circle", "a purple dog"], torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("name", ["train_reward_gradient", "train_adjoint_matching"])
@pytest.mark.parametrize("flag", ["--train-prompts", "--eval-prompts"])
def test_training_scripts_refuse_bad_prompts_before_any_model_runs(name: str, flag: str, bad_prompts: Path,
                                                                   tmp_path: Path, no_model_forward, capsys) -> None:
    script = load_script(name)
    args = ONE_UPDATE + ["--run-dir", str(tmp_path / "run"), flag, str(bad_prompts)]
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
    with pytest.raises(PromptError, match=rf"(?s)--train-prompts {bad_prompts}: .*'a purple dog'"):
        script.main(tyro.cli(script.Config, args=args))
    assert not list((tmp_path / "data").glob("chunk*"))


def test_evaluate_refuses_bad_prompts_before_sampling(bad_prompts: Path, tmp_path: Path, no_model_forward) -> None:
    script = load_script("evaluate")
    cfg = tyro.cli(script.Config, args=["--backbone", "shapes-random", "--num-steps", "2", "--best-of", "2",
                                        "--out-dir", str(tmp_path / "out"), "--prompts", str(bad_prompts)])
    with pytest.raises(PromptError, match=rf"(?s)--prompts {bad_prompts}: .*'a purple dog'"):
        script.main(cfg)


def test_the_env_and_sampling_use_the_same_check(shapes_random: ShapesWorld) -> None:
    from fluxguide.envs import GuidanceCore

    with pytest.raises(PromptError, match=r"(?s)'a purple dog'.*ShapesWorld cannot render these prompts"):
        GuidanceCore(shapes_random, reward=lambda im, p: torch.zeros(len(p)), prompts=["a red circle", "a purple dog"])
    with pytest.raises(PromptError, match="'a purple dog'"):
        shapes_random.sample(["a purple dog"], num_steps=2)
    assert issubclass(PromptError, UserError) and issubclass(PromptError, ValueError)


# ----------------------------------------------------------------- evaluate.py: every policy before sampling
def small_mlp(latent_channels: int = 48, hidden_dim: int = 8) -> MLPGuidanceModel:
    return MLPGuidanceModel(latent_channels=latent_channels, hidden_dim=hidden_dim, num_layers=1, vec_dim=64,
                            grid_size=8)


def test_evaluate_checks_every_policy_against_the_backbone_before_sampling(tmp_path: Path,
                                                                           shapes_random: ShapesWorld,
                                                                           monkeypatch) -> None:
    """Before, every reference row (base, CFG, best-of-N) was sampled before the policy's first call failed."""
    good = save_guidance_model(build_policy("mlp", shapes_random, hidden_dim=8, num_layers=1),
                               tmp_path / "good.safetensors")
    other = save_guidance_model(small_mlp(latent_channels=16), tmp_path / "other.safetensors")  # another base model's
    script = load_script("evaluate")
    cfg = tyro.cli(script.Config, args=["--backbone", "shapes-random", "--num-steps", "2", "--best-of", "2",
                                        "--num-prompts", "2", "--samples-per-prompt", "1",
                                        "--out-dir", str(tmp_path / "out"), "--policies", str(good), str(other)])
    monkeypatch.setattr(ShapesWorld, "forward", fail_if_called)  # any sampling fails the test
    with pytest.raises(PolicyMismatchError, match=r"(?s)other.safetensors.*does not fit ShapesWorld.*"
                                                  r"latent_channels 16.*48"):
        script.main(cfg)


def test_evaluate_compares_the_fingerprint_a_run_recorded(tmp_path: Path, shapes_random: ShapesWorld,
                                                          monkeypatch) -> None:
    from fluxguide.checkpointing import save_checkpoint
    from fluxguide.provenance import FingerprintError

    run_dir = tmp_path / "runs" / "rg"
    policy = build_policy("mlp", shapes_random, hidden_dim=8, num_layers=1)
    save_checkpoint(run_dir, 1, modules={"policy": policy}, state={"backbone_fingerprint": "0123456789abcdef"})
    save_guidance_model(policy, run_dir / "guidance.safetensors")
    script = load_script("evaluate")
    cfg = tyro.cli(script.Config, args=["--backbone", "shapes-random", "--num-steps", "2", "--best-of", "2",
                                        "--out-dir", str(tmp_path / "out"), "--policies", str(run_dir)])
    monkeypatch.setattr(ShapesWorld, "forward", fail_if_called)
    with pytest.raises(FingerprintError, match=r"(?s)guidance.safetensors was trained against another base model "
                                               r"\(backbone fingerprint 0123456789abcdef"):
        script.main(cfg)


# ------------------------------------------------------------------- a plain nn.Module is not a policy
class PlainModule(nn.Module):
    """A guidance function that is not a BaseGuidanceModel: it cannot be saved with its config."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        return self.w * pred


def make_plain(backbone, **sizes) -> nn.Module:
    return PlainModule()


def test_a_plain_module_policy_is_refused_when_built(shapes_random: ShapesWorld, tmp_path: Path, capsys) -> None:
    """Before, a run trained it and failed at its first checkpoint (save_guidance_model needs a config)."""
    with pytest.raises(PolicyPluginError, match=r"(?s)policy '.*:make_plain' built a PlainModule, not a "
                                                r"fluxguide guidance network.*BaseGuidanceModel.*register_config"):
        build_policy(f"{__name__}:make_plain", shapes_random)
    script = load_script("train_reward_gradient")
    with pytest.raises(SystemExit) as info:
        cli(script.main, script.Config, args=ONE_UPDATE + ["--run-dir", str(tmp_path / "run"),
                                                            "--policy", f"{__name__}:make_plain"])
    assert info.value.code == 2 and "not a fluxguide guidance network" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------- a policy file: the config's shapes before allocating
def test_a_config_that_disagrees_with_its_weights_is_refused_before_allocating(tmp_path: Path, monkeypatch) -> None:
    """A config asking for a much larger network than its weights: the tensor shapes are compared from the file's
    header and a build on the meta device, so no parameter of the config's size is ever allocated."""
    path = save_guidance_model(small_mlp(hidden_dim=8), tmp_path / "policy.safetensors")
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(small_mlp(hidden_dim=2048).config)})
    allocated: list[str] = []
    reset = nn.Linear.reset_parameters

    def spy(self: nn.Linear) -> None:
        allocated.append(self.weight.device.type)
        reset(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    with pytest.raises(GuidanceFileError, match=r"first differing tensor '[\w.]+': file \(8, \d+\) vs config "
                                                r"\(2048, \d+\)"):
        load_guidance_model(path)
    assert allocated and set(allocated) == {"meta"}, allocated
    assert issubclass(GuidanceFileError, UserError) and issubclass(GuidanceFileError, ValueError)
