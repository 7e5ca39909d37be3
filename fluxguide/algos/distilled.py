"""Distil, then fine-tune: the chain behind the best text-aware result measured (docs/results.md, "Neural guidance
from a distilled start") as one registered algorithm, ``reward-gradient-distilled``.

Three stages in one run folder, each resumable from its own subfolder: collect CFG 3's corrections
(``collect_data.py`` into ``data/``), distil them into the text-aware attention network (``train_bc.py`` into
``bc/``), and fine-tune that network under an affine head by reward gradient (``train_reward_gradient.py --preset
shapes-distilled --init-policy bc/guidance.safetensors`` into ``rl/``). Each stage's defaults are its script's
default recipe. One command runs it (``compare.py --algorithms reward-gradient-distilled``, which also evaluates
it next to the base sampler and CFG), one Python call too (:func:`fluxguide.harness.launch.run_algorithm`);
rerunning either skips the stages that finished and resumes the one that stopped.
"""

from __future__ import annotations

from dataclasses import replace

from fluxguide.algos.bc import SPECS as BC_SPECS
from fluxguide.algos.registry import AlgorithmSpec, full_budget
from fluxguide.algos.reward_gradient import SPECS as RG_SPECS
from fluxguide.algos.reward_gradient import RewardGradient

COLLECT, DISTIL = BC_SPECS[0].stages  # behaviour cloning's collection and training, with their budgets
(FINE_TUNE,) = RG_SPECS[0].stages  # reward gradient's training stage, with its smoke budget

SPECS = (AlgorithmSpec(
    "reward-gradient-distilled",
    "distil CFG 3 into the attention network, then fine-tune it by reward gradient (collect, BC, RL)",
    (COLLECT, replace(DISTIL, folder="bc"),
     # The fine-tuning starts where the distillation's final evaluation left the policy (the head adds nothing
     # yet), on the same noise: it does not evaluate it again.
     replace(FINE_TUNE, folder="rl", inputs={"--init-policy": "bc/guidance.safetensors"},
             args=("--preset", "shapes-distilled", "--no-eval-at-start"),
             budgets={**FINE_TUNE.budgets, "full": full_budget(640)})),
    RewardGradient, main_job=True),)
