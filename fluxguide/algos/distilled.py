"""Distil, then fine-tune: the best text-aware guidance measured (docs/results.md, "The chain in one command") as one
registered algorithm, ``reward-gradient-distilled``, in the main job.

Three stages in one run folder, each resumable from its own subfolder: collect CFG 3's corrections
(``collect_data.py`` into ``data/``), distil them into the text-aware attention network (``train_bc.py`` into
``bc/``), and fine-tune that network under an affine head by reward gradient (``train_reward_gradient.py --preset
shapes-distilled --init-policy bc/guidance.safetensors`` into ``rl/``: the composite reward, 72 updates of 16
images). The first two stages are behaviour cloning's, at its budget of the main job (``fluxguide.algos.bc``: 128
trajectories, 400 updates, one evaluation), so the main job trains them once for both rows; the fine-tuning does
not evaluate its start again (the distillation's last evaluation did, on the same noise). One command runs it
(``bash run.sh main`` trains it with the others; ``compare.py --algorithms reward-gradient-distilled`` alone), one
Python call too (:func:`fluxguide.harness.launch.run_algorithm`); rerunning either skips the stages that finished
and resumes the one that stopped. ``benchmarks/time_to_quality.py`` measures it against the three-script recipe it
replaced.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fluxguide.algos.bc import SPECS as BC_SPECS
from fluxguide.algos.registry import AlgorithmSpec, full_budget
from fluxguide.algos.reward_gradient import SPECS as RG_SPECS
from fluxguide.algos.reward_gradient import RewardGradient

COLLECT, DISTIL = BC_SPECS[0].stages  # behaviour cloning's collection and training, with their budgets
(FINE_TUNE,) = RG_SPECS[0].stages  # reward gradient's training stage, with its smoke budget


def distil_then_fine_tune(name: str, description: str, preset: str, algorithm: type, **options: Any) -> AlgorithmSpec:
    """A chain of three stages in one run folder: behaviour cloning's collection (``data/``) and distillation
    (``bc/``), then ``train_reward_gradient.py --preset preset`` from the distilled policy (``rl/``). ``options``
    are the spec's (``main_job``, ``minutes``, ``reward``)."""
    # The fine-tuning starts where the distillation's final evaluation left the policy (the head adds nothing
    # yet), on the same noise: it does not evaluate it again.
    fine_tune = replace(FINE_TUNE, folder="rl", inputs={"--init-policy": "bc/guidance.safetensors"},
                        args=("--preset", preset, "--no-eval-at-start"),
                        budgets={**FINE_TUNE.budgets, "full": full_budget(640)})
    return AlgorithmSpec(name, description, (COLLECT, replace(DISTIL, folder="bc"), fine_tune), algorithm, **options)


SPECS = (distil_then_fine_tune(
    "reward-gradient-distilled",
    "distil CFG 3 into the attention network, then fine-tune it by reward gradient (collect, BC, RL)",
    "shapes-distilled", RewardGradient, main_job=True, minutes=6.5),)
