"""No test helper is defined in more than one test file (issue 28).

A helper two test files need lives in one place and is imported: a fixture in a ``conftest.py`` (``tests/conftest.py``
for the whole tree: the shapes worlds, the tiny Flux folder), a plain function or constant in a shared module
(``tests/scripts.py``: loading and running the scripts; ``tests/toy_rewards.py``; a folder's ``__init__.py``). A
copy drifts: the script loader had been copied into fifteen files, the random shapes world into eight fixtures.

The rule is by name: a module-level function, fixture (by the name pytest knows it by) or class defined in two test
files fails, even when the two do different things, since a fixture name that means one world here and another
there misleads the reader as much as a copy does. Test functions and ``Test*`` classes are not helpers.
"""

from __future__ import annotations

import ast
import warnings
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: Not test code: ``fixtures/legacy/make_fixtures.py`` wrote the legacy-checkpoint fixtures once, at their source
#: commit, and is kept as it ran there (it imports that commit's module paths and cannot run today), so its helpers
#: (``f64``, ``class_tree``, ...) are the record of how the fixtures were made, not code a test shares.
NOT_TEST_CODE = ("fixtures",)

#: Duplicates still to remove, named here rather than skipped unseen (a warning says when one is gone, so that it
#: leaves this list). None now: the sampling tests' fixed-size Flux is ``fixed_tiny_flux``, the policy tests'
#: world-sized one ``tiny_flux``, and ``obs_td`` lives in tests/policies/conftest.py.
PENDING: set[str] = set()


def is_pytest_hook(name: str) -> bool:
    """Hooks (``pytest_configure``, ``pytest_collection_modifyitems``, ...) are per file by pytest's design: pytest
    calls the hook of every conftest.py that defines it, so each folder's is its own, not a copy."""
    return name.startswith("pytest_")


def checked_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if p.relative_to(TESTS).parts[0] not in NOT_TEST_CODE)


def fixture_name(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The name pytest knows a function by: a fixture's ``name=`` if it gives one, else the function's."""
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Call) and "fixture" in ast.unparse(decorator.func):
            for keyword in decorator.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    return node.name


def helpers(path: Path) -> set[str]:
    """The module-level helpers ``path`` defines: functions and fixtures other than tests, classes other than
    ``Test*`` ones."""
    names = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = fixture_name(node)
            if not name.startswith("test_") and not is_pytest_hook(name):
                names.add(name)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("Test"):
            names.add(node.name)
    return names


def defined_in() -> dict[str, list[str]]:
    where: dict[str, list[str]] = defaultdict(list)
    for path in checked_files():
        for name in helpers(path):
            where[name].append(str(path.relative_to(TESTS.parent)))
    return where


def test_no_helper_is_defined_in_more_than_one_file() -> None:
    repeated = {name: files for name, files in defined_in().items() if len(files) > 1 and name not in PENDING}
    assert not repeated, (
        "helpers defined in more than one test file (move each to one place and import it: a fixture to a "
        "conftest.py, a function to tests/scripts.py or a shared module; or rename one if they differ): "
        + "; ".join(f"{name}: {', '.join(files)}" for name, files in sorted(repeated.items()))
    )


def test_pending_duplicates_are_named_while_they_last() -> None:
    """A name should leave :data:`PENDING` once it is defined in one file only: warn, so the list never outlives
    the copies (a warning, not a failure: the other work lands on its own schedule)."""
    where = defined_in()
    gone = sorted(name for name in PENDING if len(where.get(name, [])) < 2)
    if gone:
        warnings.warn(f"{gone} no longer defined in more than one test file: remove them from PENDING", stacklevel=1)


def test_the_check_sees_copies(tmp_path: Path) -> None:
    """The parser finds functions, fixtures under their ``name=`` and classes, and skips tests and hooks."""
    source = (
        "import pytest\n"
        "def helper(): pass\n"
        "@pytest.fixture(name='world')\ndef _world(): pass\n"
        "class Reward: pass\n"
        "class TestThing: pass\n"
        "def test_x(): pass\n"
        "def pytest_configure(config): pass\n"
    )
    (tmp_path / "a.py").write_text(source)
    assert helpers(tmp_path / "a.py") == {"helper", "world", "Reward"}
