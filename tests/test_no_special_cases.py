"""No string special case picks a reward, a device or a preset in ``fluxguide/`` (issue 28): the Backbone contract
carries it (``Backbone.default_reward`` / ``reward_kwargs`` / ``build_reward``, ``world_name`` and the world a reward
declares). Read from the source with ``ast``, so prose in docstrings and comments does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fluxguide.backbones.registry import BACKBONES
from fluxguide.rewards import available_rewards

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fluxguide"


#: Reward names that are also ordinary words of the library (a reduction, a kind of value), not special cases.
ORDINARY_WORDS = frozenset({"sum", "callable"})


def _names() -> frozenset[str]:
    """The backbone and reward names: none of them may be compared as a string inside the library."""
    return (frozenset(BACKBONES.names()) | frozenset(available_rewards())) - ORDINARY_WORDS


def _strings(node: ast.AST) -> list[str]:
    """The string constants of ``node``: itself, or the items of a tuple / list / set display."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def special_cases(source: str, names: frozenset[str]) -> list[str]:
    """``line: what`` for each special case in ``source``: a ``preset_name`` attribute, a ``startswith`` /
    ``endswith`` test on a backbone or reward name's prefix, or a comparison (``==``, ``!=``, ``in``) with one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "preset_name":
            found.append(f"{node.lineno}: a preset_name attribute")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr") and "preset_name" in _strings(node.args[1] if len(node.args) > 1
                                                                                 else ast.Constant(None)):
            found.append(f"{node.lineno}: {node.func.id}(..., 'preset_name')")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "endswith") and node.args:
            prefixes = [s for s in _strings(node.args[0]) if any(s == n or s.startswith(f"{n}-") for n in names)]
            if prefixes:
                found.append(f"{node.lineno}: {node.func.attr}({prefixes[0]!r})")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
                hits = sorted({s for operand in operands for s in _strings(operand)} & names)
                if hits:
                    found.append(f"{node.lineno}: compares with {hits[0]!r}")
    return found


def test_the_check_finds_each_kind_of_special_case() -> None:
    names = frozenset({"tiny-flux", "shapes", "clip"})
    source = (
        "backbone.preset_name = 'tiny-flux'\n"
        "getattr(backbone, 'preset_name', None)\n"
        "key.startswith('shapes-')\n"
        "if name == 'tiny-flux': pass\n"
        "if key in ('clip', 'style'): pass\n"
        "'''a docstring that says name == \"tiny-flux\"'''\n"
        "x = {'clip': 1}['clip']  # a dict key is no comparison\n"
    )
    assert [line.split(":")[0] for line in special_cases(source, names)] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_backbone_or_reward_name_special_case(path: Path) -> None:
    found = special_cases(path.read_text(), _names())
    assert not found, (
        f"{path.relative_to(ROOT)} picks behaviour by a name:\n  " + "\n  ".join(found)
        + "\nlet the backbone say it (Backbone.default_reward / reward_kwargs / build_reward, world_name) or the "
        "reward declare it (fluxguide.rewards.registry.world_reward, its factory's signature)"
    )
