"""Issue 27: one error path in the scripts. Every refusal of a user's input is one line ``error: ...`` on stderr
naming the input and the fix, with exit status 2 and no traceback; ``--debug`` (or ``FLUXGUIDE_DEBUG=1``) shows
the traceback. Each case here ended in a raw traceback (exit 1) before: prompt files, plug-in modules that fail
to import, reward options a factory does not take, a missing dataset or weight folder, a damaged metrics file,
a missing policy file, PPO's minibatch larger than its batch, and a refusal inside one of compare.py's runs.

The scripts run in-process through :func:`fluxguide.harness.cli.cli`, the same entry point as on the command line
(only the final ``sys.exit`` differs), so each case costs the refusal, not an interpreter start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fluxguide.errors import DEBUG_ENV, UserError
from fluxguide.harness.cli import cli
from tests.scripts import ONE_UPDATE, ROOT, load_script

PPO_SMALL = ["--samples-per-prompt", "2", "--minibatch-trajectories", "2"]


def refused(capsys, script: str, args: list[str]) -> str:
    """Run ``script`` with ``args`` through ``cli``; assert a one-line refusal with exit 2; return the line."""
    module = load_script(script, module_name=f"error_path_{script}")
    with pytest.raises(SystemExit) as exit_info:
        cli(module.main, module.Config, args, presets=getattr(module, "PRESETS", None))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    # the one line, besides warnings and the progress bar of a refusal found in the first update
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def files(tmp_path: Path, monkeypatch) -> Path:
    """Bad inputs: an empty and a non-UTF-8 prompt file, a plug-in module that raises when imported, a run folder
    with a damaged metrics.jsonl, a file that is not safetensors."""
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("un cercle rouge \xe9\n".encode("latin-1"))
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom while importing')\n")
    (tmp_path / "odd_plugins.py").write_text(
        "import torch\n"
        "from fluxguide.rewards import CallableReward\n"
        "def constant_reward(**kwargs):  # claims a gradient it does not have\n"
        "    return CallableReward(lambda images, prompts: torch.ones(len(prompts)), differentiable=True)\n"
        "def not_a_backbone(**kwargs):\n"
        "    return object()\n"
        "def strict_policy(backbone, **sizes):  # passes every size on to a network that takes fewer\n"
        "    return torch.nn.Linear(**sizes)\n")
    run = tmp_path / "damaged_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"charts/samples_seen": 1}\nnot json\n{"charts/samples_seen": 2}\n')
    (tmp_path / "not_weights.safetensors").write_bytes(b"junk")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(("script", "args", "named"), [
    ("train_reward_gradient", ["--train-prompts", "{tmp}/empty.txt"], "empty.txt' holds no prompts"),
    ("train_reward_gradient", ["--train-prompts", "{tmp}/latin1.txt"], "latin1.txt' is not UTF-8"),
    ("train_ppo", ["--eval-prompts", "{tmp}/missing.txt", *PPO_SMALL], "missing.txt"),
    ("train_reward_gradient", ["--reward", "broken_plugin:make_reward"], "importing module 'broken_plugin' raised"),
    ("train_reward_gradient", ["--reward", "odd_plugins:constant_reward"], "returned rewards with no gradient"),
    ("train_reward_gradient", ["--backbone", "odd_plugins:not_a_backbone"], "not a fluxguide Backbone"),
    ("train_reward_gradient", ["--policy", "odd_plugins:strict_policy"], "refused the options it was built with"),
    ("train_ppo", ["--reward", "verifier", "--reward-kwargs", '{"nosuch": 1}', *PPO_SMALL],
     "unexpected keyword argument 'nosuch'"),
    ("train_ppo", ["--samples-per-prompt", "2", "--minibatch-trajectories", "4"], "--minibatch-trajectories 4"),
    ("train_ppo", ["--mode", "sde", "--sde-window", "1", "3", *PPO_SMALL], "sde_window (1, 3) must satisfy"),
    ("train_ppo", ["--mode", "ode", "--sde-window", "0", "1", *PPO_SMALL], "sde_window (0, 1) needs SDE mode"),
    ("train_bc", ["--dataset", "{tmp}/no_dataset"], "no guidance dataset at"),
    ("train_reward_gradient", ["--backbone", "shapes", "--weights-dir", "{tmp}/no_weights"], "is missing"),
    ("report", ["--runs", "{tmp}/damaged_run"], "line 2 is not a JSON record"),
    ("evaluate", ["--policies", "{tmp}/no_policy.safetensors", "--num-prompts", "1"], "no saved policy at"),
    ("evaluate", ["--policies", "{tmp}/not_weights.safetensors", "--num-prompts", "1"], "not a readable safetensors"),
])
def test_a_refusal_is_one_line_with_exit_2(capsys, files, script, args, named):
    tmp = str(files)
    argv = [a.replace("{tmp}", tmp) for a in args]
    small = ONE_UPDATE[2:] if "--backbone" in argv else ONE_UPDATE  # the case picks its own backbone
    common = [] if script in ("report", "evaluate") else [*small, "--run-dir", f"{tmp}/run"]
    line = refused(capsys, script, [*common, *argv])
    assert named in line, line


def test_debug_shows_the_traceback(capsys, files, monkeypatch):
    """``--debug`` re-raises the user error itself (the traceback), and passes the request to child processes."""
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored (unset) after the test: cli sets it for the children it starts
    module = load_script("train_reward_gradient", module_name="error_path_debug")
    with pytest.raises(UserError, match="holds no prompts"):
        cli(module.main, module.Config, [*ONE_UPDATE, "--run-dir", str(files / "run"), "--train-prompts",
                                              str(files / "empty.txt"), "--debug"])
    assert os.environ[DEBUG_ENV] == "1"


def test_compare_reports_a_refusal_inside_its_runs_as_one_line(tmp_path):
    """A run that compare.py starts refuses its options (exit 2): compare says why in one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, "experiments/compare.py", "--budget", "smoke", "--algorithms", "reward-gradient",
         "--out-dir", str(tmp_path / "out"), "--weights-dir", str(tmp_path / "no_weights"), "--wandb-mode", "disabled"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: reward-gradient (seed 0): shapes-world weight file" in proc.stderr, textwrap.shorten(proc.stderr, 800)
