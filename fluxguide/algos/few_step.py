"""Few-step guidance: the distil-then-fine-tune chain for a sampler of 4 or 2 base-model calls per image, as
registered algorithms (``reward-gradient-4-step``, ``reward-gradient-2-step``; docs/results.md, "Few-step
guidance").

Three stages in one run folder, like ``reward-gradient-distilled`` (:mod:`fluxguide.algos.distilled`): collect CFG
3's displacements over each coarse step (``collect_data.py --coarse-steps K``: CFG at 20 steps, one target per
coarse step, :mod:`fluxguide.data.coarse`) into ``data/``, distil them into the attention network (``train_bc.py``,
which evaluates at the dataset's K steps) into ``bc/``, and fine-tune it by reward gradient through the K-step
sampler (``train_reward_gradient.py --preset shapes-K-step``, which saves the average of the weights over about the
last 50 updates) into ``rl/``. The policy it saves samples in K calls;
``evaluate.py`` evaluates it at the K steps its run recorded, and ``--pareto-steps`` puts it on the plot of pass rate
against calls. Not in the main job (its 15 minutes are spent); run it with ``compare.py --algorithms
reward-gradient-4-step`` or :func:`fluxguide.harness.launch.run_algorithm`.
"""

from __future__ import annotations

from dataclasses import replace

from fluxguide.algos.bc import SPECS as BC_SPECS
from fluxguide.algos.registry import EVAL, SMOKE, AlgorithmSpec, full_budget
from fluxguide.algos.reward_gradient import SPECS as RG_SPECS
from fluxguide.algos.reward_gradient import RewardGradient

COLLECT, DISTIL = BC_SPECS[0].stages
(FINE_TUNE,) = RG_SPECS[0].stages

#: Trajectories of CFG at 20 steps whose coarse displacements are distilled (each also under a swapped prompt).
EPISODES = 256
#: Distillation updates: a start for the fine-tuning (more did not help: docs/results.md).
DISTIL_UPDATES = 500
#: The smoke budget's steps: 2 coarse steps of a 4-step teacher.
_SMOKE_STEPS = ("--num-steps", "2")


def _without_steps(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` without their ``--num-steps N`` (the smoke budget's 3 steps are no multiple of the coarse ones)."""
    at = args.index("--num-steps")
    return args[:at] + args[at + 2 :]


def few_step_spec(num_steps: int) -> AlgorithmSpec:
    """The chain for a ``num_steps``-step sampler."""
    smoke = _without_steps(SMOKE)
    return AlgorithmSpec(
        f"reward-gradient-{num_steps}-step",
        f"guidance at {num_steps} model calls: distil CFG 3's {num_steps}-step displacements, then fine-tune by "
        "reward gradient through the few-step sampler (collect, BC, RL)",
        (replace(COLLECT, budgets={
            "smoke": ("--episodes", "4", "--batch-size", "2", "--num-steps", "4", "--coarse-steps", "2"),
            "quick": ("--episodes", str(EPISODES), "--coarse-steps", str(num_steps)),
            "full": ("--episodes", str(4 * EPISODES), "--coarse-steps", str(num_steps))}),
         replace(DISTIL, folder="bc",
                 budgets={"smoke": ("--batch-size", "16", "--total-updates", "2", *smoke),
                          "quick": ("--total-updates", str(DISTIL_UPDATES), "--eval-every", str(DISTIL_UPDATES),
                                    "--checkpoint-every", str(DISTIL_UPDATES), "--no-eval-at-start",
                                    "--no-references", *EVAL),
                          "full": full_budget(4 * DISTIL_UPDATES)}),
         replace(FINE_TUNE, folder="rl", inputs={"--init-policy": "bc/guidance.safetensors"},
                 args=("--preset", f"shapes-{num_steps}-step", "--no-eval-at-start"),
                 budgets={**FINE_TUNE.budgets, "smoke": (*_without_steps(FINE_TUNE.budgets["smoke"]), *_SMOKE_STEPS),
                          "full": full_budget(600)})),
        RewardGradient, minutes=6.0)


SPECS = (few_step_spec(4), few_step_spec(2))
