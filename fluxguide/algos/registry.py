"""Algorithms by name: what a script, the main job and the tests need to run each one.

An :class:`AlgorithmSpec` names an algorithm and how it is run: its training script (and, for behaviour cloning,
the collection before it), the algorithm class, what reward it needs, and the arguments of each budget of
``experiments/compare.py`` ("smoke": every code path in a minute; "quick": the script's own default budget, the
main job; "full": about four times the samples). :data:`ALGORITHMS` holds the built-in ones and reads the
``fluxguide.algorithms`` entry-point group, so an installed package adds an algorithm without editing fluxguide::

    [project.entry-points."fluxguide.algorithms"]
    my-algo = "my_package.my_algo:SPEC"

A spec ``"package.module:SPEC"`` names one that is not installed (``compare.py --algorithms my_algo:SPEC``).
``compare.py`` and the tests discover every algorithm here; nothing else lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fluxguide.errors import UserError
from fluxguide.plugins import PluginError, Registry

#: The repository's ``experiments/`` folder: where the built-in algorithms' scripts are.
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
#: The budgets of ``experiments/compare.py``.
BUDGETS: tuple[str, ...] = ("smoke", "quick", "full")
#: Smoke arguments every training script takes: a tiny network on 3 steps, evaluated on 2 prompts.
SMOKE: tuple[str, ...] = (
    "--num-steps", "3", "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1", "--eval-every", "2",
    "--checkpoint-every", "2", "--eval-num-prompts", "2", "--eval-samples-per-prompt", "1", "--grid-prompts", "2")
#: The quick and full budgets' held-out evaluation during training (30 prompts x 4 images).
EVAL: tuple[str, ...] = ("--eval-num-prompts", "30", "--eval-samples-per-prompt", "4")


def full_budget(updates: int) -> tuple[str, ...]:
    """``updates`` updates evaluated and checkpointed eight times."""
    every = str(max(1, updates // 8))
    return ("--total-updates", str(updates), "--eval-every", every, "--checkpoint-every", every, *EVAL)


@dataclass(frozen=True)
class Stage:
    """One script run of an algorithm.

    Attributes:
        script: the script (a path; relative ones are under the repository's ``experiments/``).
        folder: the subfolder of the run folder it writes (``""``: the run folder itself).
        folder_flag: the flag that names that folder (``--run-dir``; a collection's ``--out-dir``).
        inputs: flags naming an earlier stage's folder, e.g. ``{"--dataset": "data"}``.
        args: fixed arguments (e.g. ``("--preset", "grpo")``).
        budgets: the arguments of each budget (a budget left out adds none).
    """

    script: str | Path
    folder: str = ""
    folder_flag: str = "--run-dir"
    inputs: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    budgets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        script = Path(self.script)
        return script if script.is_absolute() else EXPERIMENTS / script

    def command(self, run_dir: Path, common: Sequence[str], budget: str) -> list[str]:
        """The script and its arguments for run folder ``run_dir``."""
        inputs = [arg for flag, sub in self.inputs.items() for arg in (flag, str(run_dir / sub))]
        return [str(self.path), self.folder_flag, str(run_dir / self.folder), *inputs, *common, *self.args,
                *self.budgets.get(budget, ())]


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm and how it is run.

    Attributes:
        name: its registry name (also its W&B group in the main job).
        description: one line for listings.
        stages: the script runs, in order; the last one trains the policy (its folder holds ``metrics.jsonl``
            and ``guidance.safetensors``).
        algorithm: the :class:`~fluxguide.algos.common.Algorithm` subclass it trains with, if any.
        reward: ``"differentiable"`` (needs the reward's gradient) or ``"black-box"`` (scores only).
        main_job: trained by the main job (``bash run.sh main``) unless ``--algorithms`` says otherwise.
        minutes: about how long one run takes at the quick budget beside another run on two cores: the main job
            starts the longest runs first, so that its two lanes end together.
    """

    name: str
    description: str
    stages: tuple[Stage, ...]
    algorithm: type | None = None
    reward: Literal["differentiable", "black-box"] = "differentiable"
    main_job: bool = False
    minutes: float = 5.0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"algorithm {self.name!r} has no stage")

    def commands(self, run_dir: Path, common: Sequence[str], budget: str) -> list[list[str]]:
        """Every stage's command line for one run in ``run_dir``."""
        return [stage.command(run_dir, common, budget) for stage in self.stages]

    def training_run(self, run_dir: Path) -> Path:
        """The folder of the stage that trains the policy."""
        return run_dir / self.stages[-1].folder

    def preparation(self, run_dir: Path) -> list[Path]:
        """The folders of the stages before training (their cost counts for the algorithm)."""
        return [run_dir / stage.folder for stage in self.stages[:-1]]

    def stage_key(self, index: int) -> tuple:
        """What stage ``index`` computes, whatever folder it writes: its script, fixed arguments, budgets, and
        the earlier stages (by position) whose folders it reads."""
        stage = self.stages[index]
        position = {s.folder: i for i, s in enumerate(self.stages[:index])}

        def source(sub: str) -> tuple[int | str, str]:
            head, _, rest = sub.partition("/")
            return (position[head], rest) if head in position else (sub, "")

        return (stage.path, stage.folder_flag, stage.args, tuple(sorted(stage.budgets.items())),
                tuple(sorted((flag, source(sub)) for flag, sub in stage.inputs.items())))

    def computed_by(self, other: AlgorithmSpec) -> bool:
        """Whether ``other``'s run computes this algorithm's whole run on its way: this one's stages are
        ``other``'s first stages, with the same scripts, arguments, budgets and inputs (the distil-then-fine-tune
        chain's first two stages are behaviour cloning). The main job then trains it once, inside ``other``'s run."""
        n = len(self.stages)
        return (other.name != self.name and len(other.stages) > n
                and all(self.stage_key(i) == other.stage_key(i) for i in range(n)))


#: The built-in modules registered first, in this order: the main job's order (and its table's).
FIRST: tuple[str, ...] = ("reward_gradient", "ppo", "bc")


def builtin_specs() -> Iterator[tuple[str, AlgorithmSpec]]:
    """The ``SPECS`` of every module of ``fluxguide.algos`` (those of :data:`FIRST` first, then the others by name):
    an algorithm in a new module registers itself and no list names it."""
    import fluxguide.algos as package

    found = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    for module in [*FIRST, *(m for m in found if m not in FIRST)]:
        for spec in getattr(importlib.import_module(f"fluxguide.algos.{module}"), "SPECS", ()):
            yield spec.name, spec


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm", "fluxguide.algorithms", builtins=builtin_specs)
"""Every algorithm by name: the built-ins (each module's ``SPECS``), the ``fluxguide.algorithms`` entry points, or a
spec."""


class AlgorithmSpecError(UserError, TypeError):
    """A name or spec that does not stand for an :class:`AlgorithmSpec`."""


def register_algorithm(spec: AlgorithmSpec, *, overwrite: bool = False) -> AlgorithmSpec:
    """Add ``spec`` under ``spec.name``; returns it."""
    ALGORITHMS.register(spec.name, spec, overwrite=overwrite)
    return spec


def get_algorithm(name: str) -> AlgorithmSpec:
    """The algorithm ``name`` (a registered name, an entry point, or ``"package.module:SPEC"``).

    Raises:
        PluginError: an unknown name (the message lists the known ones) or a spec that fails to import.
        AlgorithmSpecError: the name stands for something that is not an :class:`AlgorithmSpec`.
    """
    spec = ALGORITHMS.get(name)
    if not isinstance(spec, AlgorithmSpec):
        raise AlgorithmSpecError(f"algorithm {name!r} is a {type(spec).__name__}, not an AlgorithmSpec: point the "
                                 "name or spec at a fluxguide.algos.registry.AlgorithmSpec")
    return spec


def algorithm_names() -> list[str]:
    """Every algorithm's name: the built-ins and those registered in code in registration order, then the
    installed packages' (entry points), sorted."""
    registered = list(ALGORITHMS.registered())
    return [*registered, *(name for name in ALGORITHMS.names() if name not in registered)]


def main_job_algorithms() -> tuple[str, ...]:
    """The algorithms the main job trains by default, in registration order."""
    return tuple(name for name, spec in ALGORITHMS.registered().items() if spec.main_job)


def budgets(smoke: Sequence[str], full_updates: int) -> dict[str, tuple[str, ...]]:
    """A training script's budgets: ``smoke`` plus the smoke network, its own default (quick), ``full_updates``."""
    return {"smoke": (*smoke, *SMOKE), "quick": EVAL, "full": full_budget(full_updates)}


__all__ = ["ALGORITHMS", "FIRST", "AlgorithmSpec", "AlgorithmSpecError", "PluginError", "Stage",
           "algorithm_names", "budgets", "full_budget", "get_algorithm", "main_job_algorithms", "register_algorithm"]
