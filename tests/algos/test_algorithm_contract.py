"""Issue 28: one algorithm contract. A new algorithm is one module (here a plug-in: ``tests/algos/plugin_algorithm.py``,
no library file edited), one short script and its tests; it runs through the run harness and through
``compare.py``, which discovers every algorithm from the registry."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from fluxguide.algos import PPO, AdjointMatching, BehaviourCloning, LossOutput, RewardGradient
from fluxguide.algos.common import Algorithm, NonFiniteLossError
from fluxguide.algos.registry import (
    ALGORITHMS,
    AlgorithmSpec,
    algorithm_names,
    get_algorithm,
    main_job_algorithms,
)
from fluxguide.harness.cli import cli
from fluxguide.harness.tracking import read_metrics
from fluxguide.plugins import PluginError
from tests.scripts import ROOT, load_script

PLUGIN = "tests.algos.plugin_algorithm:SPEC"
PLUGIN_FILE = ROOT / "tests" / "algos" / "plugin_algorithm.py"
TINY = ["--backbone", "shapes-random", "--num-steps", "3", "--batch-size", "2", "--total-updates", "2",
        "--eval-every", "2", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2",
        "--wandb-mode", "disabled"]


def test_every_algorithm_class_declares_the_contract() -> None:
    for cls in (RewardGradient, AdjointMatching, PPO, BehaviourCloning):
        assert issubclass(cls, Algorithm) and cls.name, cls
        assert get_algorithm(cls.name).algorithm is cls
    assert main_job_algorithms() == ("reward-gradient", "ppo", "bc", "reward-gradient-distilled")
    assert {"reward-gradient", "ppo", "bc", "grpo", "adjoint-matching"} <= set(algorithm_names())
    assert get_algorithm("grpo").stages[0].args == ("--preset", "grpo")  # GRPO: PPO's script, Flow-GRPO's recipe


def test_the_shared_update_refuses_a_non_finite_loss_and_steps_nothing() -> None:
    class Quadratic(Algorithm):
        name = "quadratic"

        def __init__(self) -> None:
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.config = None
            self.modules = {"policy": torch.nn.ParameterList([self.weight])}
            self.optimizers = {"policy": torch.optim.SGD([self.weight], lr=0.1)}

        def loss(self, target: torch.Tensor) -> LossOutput:
            return LossOutput({"loss_fit": (self.weight - target).square().sum()}, {"target_mean": float(target.mean())})

    algo = Quadratic()
    metrics = algo.update(torch.zeros(3))
    assert metrics["loss"] == metrics["loss_fit"] == 3.0 and metrics["target_mean"] == 0.0 and metrics["grad_norm"] > 0
    assert torch.allclose(algo.weight.detach(), torch.full((3,), 0.8))  # one SGD step on the summed loss_* terms
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        algo.update(torch.full((3,), float("nan")))
    assert torch.allclose(algo.weight.detach(), torch.full((3,), 0.8))


def test_the_plugin_is_one_module_and_a_short_script() -> None:
    spec = get_algorithm(PLUGIN)  # by spec: nothing in fluxguide/ names it
    assert isinstance(spec, AlgorithmSpec) and spec.name == "last-step-reward"
    assert spec.name not in ALGORITHMS.registered()
    assert len(PLUGIN_FILE.read_text().splitlines()) <= 120
    library = "\n".join(p.read_text() for p in (ROOT / "fluxguide").rglob("*.py"))
    assert "last-step-reward" not in library and "plugin_algorithm" not in library
    ast.parse(PLUGIN_FILE.read_text())


def test_the_plugin_trains_through_the_harness(tmp_path) -> None:
    script = load_script("plugin_algorithm", "tests/algos", module_name="contract_plugin_script")
    run = tmp_path / "run"
    metrics = cli(script.main, script.Config, [*TINY, "--reward", "shapes-clip", "--run-dir", str(run)])
    assert "eval/verifier_pass_rate" in metrics
    records = read_metrics(run)
    assert [r["charts/samples_seen"] for r in records if "train/reward_mean" in r] == [2, 4]
    assert (run / "guidance.safetensors").is_file() and list((run / "checkpoints").glob("step_*"))


def test_compare_runs_the_plugin_and_lists_every_algorithm(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    listed = subprocess.run([sys.executable, "experiments/compare.py", "--algorithms"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    for name in algorithm_names():
        assert any(line.startswith(name + " ") for line in listed.splitlines()), listed
    out = tmp_path / "compare"
    proc = subprocess.run(
        [sys.executable, "experiments/compare.py", "--budget", "smoke", "--algorithms", PLUGIN, "--out-dir", str(out),
         "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--wandb-mode", "disabled"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "runs" / "last-step-reward" / "seed0" / "guidance.safetensors").is_file()
    assert "| last-step-reward |" in (out / "evaluation.md").read_text()
    assert "last-step-reward: " in proc.stdout


def test_an_unknown_algorithm_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(PluginError, match="unknown algorithm 'nosuch'; valid names: .*reward-gradient"):
        get_algorithm("nosuch")
