"""Every training script runs at 1 and 2 sampling steps (few-step guidance, issue 32): the smallest schedules
reach every per-step code path (a last step that is also the first, windows and time thresholds on one step)."""

from __future__ import annotations

import pytest

from tests.experiments.test_presets import COLLECT, TINY, TRAINING, parse, smoke_budget
from tests.scripts import load_script


def at_steps(args: list[str], steps: int) -> list[str]:
    """``args`` with their ``--num-steps`` set to ``steps``."""
    at = args.index("--num-steps")
    return [*args[:at], "--num-steps", str(steps), *args[at + 2 :]]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", TRAINING)
def test_every_training_script_runs_at_one_and_two_steps(name: str, steps: int, tmp_path) -> None:
    script = load_script(name)
    args = ["--run-dir", str(tmp_path / "run"), *smoke_budget(name), *at_steps(TINY, steps)]
    if "--time-subsample" in args:  # Adjoint Matching's loss times: at most the steps (a clear error otherwise)
        args[args.index("--time-subsample") + 1] = str(min(2, steps))
    if name == "train_bc":
        collect = load_script("collect_data")
        collect.main(parse(collect, ["--out-dir", str(tmp_path / "data"), *at_steps(COLLECT, steps)]))
        args += ["--dataset", str(tmp_path / "data")]
    result = script.main(parse(script, args))
    assert (tmp_path / "run" / "guidance.safetensors").is_file()
    assert 0.0 <= result["eval/verifier_pass_rate"] <= 1.0
