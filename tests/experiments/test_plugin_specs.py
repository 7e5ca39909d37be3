"""A ``package.module:factory`` spec reaches every training script: ``--reward`` (reward gradient, PPO) and
``--policy`` (behaviour cloning, which has no reward), one update each on a random shapes world."""

from __future__ import annotations

import tyro

from fluxguide.policies import MLPGuidanceModel, load_guidance_model
from tests.experiments import plugins
from tests.scripts import SMALL_RUN, load_script, run_script

TINY = [*SMALL_RUN, "--total-updates", "1", "--eval-every", "1", "--checkpoint-every", "1"]


def run_tiny(name: str, argv: list[str]) -> dict[str, float]:
    """One update of ``experiments/<name>.py`` at :data:`TINY` sizes, with ``argv``."""
    return run_script(load_script(name, module_name=f"plugin_{name}"), TINY + argv)


def test_reward_spec_trains_reward_gradient_and_ppo(tmp_path) -> None:
    for name, extra in (("train_reward_gradient", ["--batch-size", "2"]),
                        ("train_ppo", ["--batch-size", "4", "--samples-per-prompt", "2",
                                       "--minibatch-trajectories", "2", "--epochs", "1"])):
        plugins.BUILT.clear()
        final = run_tiny(name, extra + ["--reward", "tests.experiments.plugins:make_reward_fn",
                                        "--run-dir", str(tmp_path / name)])
        (reward,) = plugins.BUILT
        assert isinstance(reward, plugins.CountingReward) and reward.calls >= 2, name  # training and evaluation
        assert "eval/reward_mean" in final and (tmp_path / name / "guidance.safetensors").is_file()


def test_policy_spec_trains_bc(tmp_path) -> None:
    collect = load_script("collect_data", module_name="plugin_collect_data")
    collect.main(tyro.cli(collect.Config, args=["--backbone", "shapes-random", "--num-steps", "3", "--wandb-mode",
                                                "disabled", "--episodes", "2", "--batch-size", "2",
                                                "--out-dir", str(tmp_path / "data")]))
    plugins.BUILT.clear()
    run_tiny("train_bc", ["--dataset", str(tmp_path / "data"), "--batch-size", "8", "--warmup-updates", "1",
                          "--policy", "tests.experiments.plugins:make_policy_fn", "--run-dir", str(tmp_path / "bc")])
    assert len(plugins.BUILT) == 1 and isinstance(plugins.BUILT[0], MLPGuidanceModel)
    assert isinstance(load_guidance_model(tmp_path / "bc" / "guidance.safetensors"), MLPGuidanceModel)
