"""The layer rules of docs/design.md ("Layers"), checked on the source by parsing every import with ``ast``.

Layers, bottom to top (a module may import its own folder and any lower layer, never a higher one)::

    0  infrastructure: fluxguide/plugins.py, keys.py, serialization.py, provenance.py, checkpointing.py,
       distributed.py, locking.py, errors.py, lazy.py (top-level modules; they may import each other)
    1  sampling      schedule, steps, packing, SDE action math, denoise, instrumented, CFG
    2  rewards       the reward contract, registry, CLIP / aesthetic / style / composition
    3  backbones     the Backbone contract, Flux, BFL-signature modules, tiny Flux, the backbone registry
                     (which builds a backbone's default reward, hence above rewards)
    4  worlds        self-contained worlds (shapes) on the Backbone contract; reached from above only
                     through entry points (pyproject.toml), never imported by name
    5  policies      guidance networks, TorchRL actors / critics, the architecture registry
    6  envs          GuidanceCore and its Gymnasium / VectorEnv / TorchRL faces, prompt sets
    7  data          episodes, the dataset store, teachers, target strategies, the collector
    8  algos         reward_gradient, ppo, bc, the trainer
    9  harness       what every script shares: run folder, tracking, evaluation, curves, grids
    scripts          experiments/, benchmarks/ (import anything; nothing in fluxguide imports them)

Every import counts, including those inside functions (lazy imports still make a dependency). The seed's
alias modules (``fluxguide/guidance_models.py``, ``fluxguide/sampling_instrumented.py``) and the public
façade ``fluxguide/__init__.py`` sit above everything and may import anything. ``from fluxguide import X``
must name a submodule (the façade's lazy names are for users, not for the library).

Besides: no folder-level import cycle, and nothing outside ``fluxguide/worlds/`` imports a world or tests
``isinstance(..., ShapesWorld)`` (the shapes world's own scripts are allowed, listed below).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.scripts import ROOT

PACKAGE = ROOT / "fluxguide"

INFRA = ("plugins", "keys", "serialization", "provenance", "checkpointing", "distributed",
         "locking", "errors", "lazy")
RANKS: dict[str, int] = {
    **dict.fromkeys(INFRA, 0),
    "sampling": 1,
    "rewards": 2,
    "backbones": 3,
    "worlds": 4,
    "policies": 5,
    "envs": 6,
    "data": 7,
    "algos": 8,
    "harness": 9,
}
#: Above every layer: the public façade and the seed's module paths (thin aliases).
FACADES = {"fluxguide/__init__.py", "fluxguide/guidance_models.py", "fluxguide/sampling_instrumented.py"}
#: Scripts about the shapes world itself, which may import it by name.
WORLD_SCRIPTS = {"experiments/pretrain_shapes_world.py", "benchmarks/shapes_world.py"}
WORLD_MODULE = re.compile(r"fluxguide\.worlds(\.\w+)*(:[\w.]+)?")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, relative ones resolved; ``from a import b`` gives
    ``a.b`` (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def layer_of(module: str) -> str | None:
    """The layer (a key of RANKS) of a ``fluxguide`` module, ``"fluxguide"`` for the façade itself, else None."""
    parts = module.split(".")
    if parts[0] != "fluxguide":
        return None
    if len(parts) == 1 or parts[1] not in RANKS and not (PACKAGE / parts[1]).exists() \
            and not (PACKAGE / f"{parts[1]}.py").exists():
        return "fluxguide"  # the façade, or one of its lazy names
    return parts[1]


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if str(p.relative_to(ROOT)) not in FACADES)


def script_files() -> list[Path]:
    return sorted([*(ROOT / "experiments").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_folder_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "guidance_models", "sampling_instrumented"}
    assert folders | modules <= set(RANKS), f"give {sorted((folders | modules) - set(RANKS))} a layer in RANKS"


@pytest.mark.parametrize("path", library_files(), ids=_rel)
def test_no_upward_import(path: Path) -> None:
    own = _rel(path).split("/")[1].removesuffix(".py")
    rank = RANKS[own]
    bad = []
    for line, module in imports(path):
        if module.split(".")[0] in ("experiments", "benchmarks"):
            bad.append(f"line {line}: {module} (a script)")
            continue
        layer = layer_of(module)
        if layer is None or layer == own:
            continue
        if layer == "fluxguide":
            bad.append(f"line {line}: {module} (the public façade; import the submodule that defines it)")
        elif RANKS[layer] > rank or (RANKS[layer] == rank and rank != 0):
            bad.append(f"line {line}: {module} ({layer}, layer {RANKS[layer]}, above {own}, layer {rank})")
    assert not bad, f"{_rel(path)} imports upward:\n  " + "\n  ".join(bad)


def test_no_cycle_between_folders() -> None:
    graph: dict[str, set[str]] = {}
    for path in library_files():
        own = _rel(path).split("/")[1].removesuffix(".py")
        for _, module in imports(path):
            layer = layer_of(module)
            if layer not in (None, own, "fluxguide"):
                graph.setdefault(own, set()).add(layer)  # type: ignore[arg-type]

    def cycle_from(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return [*trail[trail.index(node):], node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, [*trail, node])
            if found:
                return found
        return None

    for start in sorted(graph):
        cycle = cycle_from(start, [])
        assert cycle is None, f"import cycle between folders: {' -> '.join(cycle)}"


def _world_references(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [f"line {line}: import {m}" for line, m in imports(path) if m.startswith("fluxguide.worlds")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and WORLD_MODULE.fullmatch(node.value):
            found.append(f"line {node.lineno}: names the module {node.value!r}")
        elif isinstance(node, ast.Name) and node.id == "ShapesWorld":
            found.append(f"line {node.lineno}: uses ShapesWorld")
        elif isinstance(node, ast.Attribute) and node.attr == "ShapesWorld":
            found.append(f"line {node.lineno}: uses .ShapesWorld")
    return found


@pytest.mark.parametrize(
    "path",
    [p for p in [*library_files(), *script_files()] if not _rel(p).startswith("fluxguide/worlds/")
     and _rel(p) not in WORLD_SCRIPTS],
    ids=_rel,
)
def test_no_world_by_name_outside_worlds(path: Path) -> None:
    """A world reaches the rest through the Backbone contract and entry points, not by name."""
    found = _world_references(path)
    assert not found, (
        f"{_rel(path)} names the shapes world (use build_backbone('shapes'), the 'shapes-train' / 'shapes-heldout' "
        f"prompt sets and Backbone.verifier instead):\n  " + "\n  ".join(found)
    )


def test_the_checker_sees_imports_inside_functions() -> None:
    assert (90, "fluxguide.backbones.flux.FluxBackbone") in imports(PACKAGE / "envs" / "registration.py") or any(
        m == "fluxguide.backbones.flux.FluxBackbone" for _, m in imports(PACKAGE / "envs" / "registration.py")
    )
    assert layer_of("fluxguide.keys") == "keys"
    assert layer_of("fluxguide.envs.core.GuidanceCore") == "envs"
    assert layer_of("fluxguide.build_backbone") == "fluxguide"
    assert layer_of("torch.nn") is None


# Sizes (docs/design.md, "Style"): small modules named after their concept, and scripts that hold only what is
# specific to their algorithm (the shared harness lives in fluxguide/harness).
MAX_MODULE_LINES = 450
MAX_TRAINING_SCRIPT_LINES = 600


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_too_long(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concept"


def test_the_training_scripts_stay_short() -> None:
    scripts = [ROOT / "experiments" / f"train_{name}.py" for name in ("reward_gradient", "ppo", "bc")]
    total = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in scripts)
    assert total <= MAX_TRAINING_SCRIPT_LINES, (
        f"{[p.name for p in scripts]} hold {total} lines: move shared lines into fluxguide/harness")
