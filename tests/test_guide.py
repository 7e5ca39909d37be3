"""Every code block of ``docs/guide.md`` that is meant to run, runs as written.

The guide's blocks are run section by section (``## `` headings), in order, in one fresh namespace per
section and a scratch working directory:

- a ``python`` block is executed, unless its first line is ``# not run: <reason>`` (then it is compiled,
  its ``fluxguide`` imports are executed, and the test is skipped with that reason) or ``# file: NAME``
  (then it is written to ``NAME`` in the working directory, for the blocks after it to use);
- a ``bash`` block is run with ``bash`` in the working directory, with the project's Python first on
  ``PATH`` and ``experiments/`` linked in, unless it starts with ``# not run:``;
- other blocks (``mermaid``, plain text) are not code.

Real objects only: the shapes world's shipped weights and tiny random Flux pipelines built in code.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scripts import ROOT

GUIDE = ROOT / "docs" / "guide.md"
NOT_RUN = "# not run:"
FILE = "# file:"
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, code, first code line (1-based) and ``## `` section."""

    lang: str
    code: str
    line: int
    section: str

    @property
    def first_line(self) -> str:
        return self.code.lstrip().splitlines()[0].strip() if self.code.strip() else ""

    @property
    def not_run_reason(self) -> str | None:
        first = self.first_line
        return first[len(NOT_RUN):].strip() if first.startswith(NOT_RUN) else None

    @property
    def file_name(self) -> str | None:
        first = self.first_line
        return first[len(FILE):].strip() if first.startswith(FILE) else None

    @property
    def where(self) -> str:
        return f"{GUIDE.relative_to(ROOT)}:{self.line}"


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, in order, with the ``## `` section each is in."""
    blocks: list[Block] = []
    section, lang, start, lines = "", None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if lang is None:
            match = FENCE.match(line)
            if match:
                lang, start, lines = match.group(1), number + 1, []
            elif line.startswith("## "):
                section = line[3:].strip()
        elif line.strip() == "```":
            blocks.append(Block(lang, "\n".join(lines) + "\n", start, section))
            lang = None
        else:
            lines.append(line)
    assert lang is None, f"unclosed code block opened at {GUIDE}:{start - 1}"
    return blocks


BLOCKS = parse_blocks(GUIDE.read_text(encoding="utf-8"))
# A section whose every block is '# not run:' (a long job's commands; their flags are tested elsewhere) has
# nothing to run here.
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS
                              if b.lang in ("python", "bash") and b.not_run_reason is None))
NOT_RUN_BLOCKS = [b for b in BLOCKS if b.lang == "python" and b.not_run_reason is not None]


def test_guide_covers_every_topic() -> None:
    assert SECTIONS == [
        "Concepts",
        "Plug in a new algorithm",
        "Plug in a new reward",
        "Plug in a new guidance architecture",
        "Plug in a new backbone",
        "Use the env from another RL library",
        "Compare rewards and catch reward hacking",
        "W&B dashboards",
    ]
    assert any(b.lang == "mermaid" for b in BLOCKS)
    for block in BLOCKS:
        if block.lang in ("python", "bash") and block.first_line.startswith("# not run"):
            assert block.not_run_reason, f"{block.where}: say why the block is not run ('# not run: reason')"


def project_env() -> dict[str, str]:
    """The environment of a bash block: this interpreter's folder first on PATH, one thread, offline."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }


def run_bash(block: Block, cwd: Path) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=project_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (
        f"the bash block at {block.where} failed with exit code {proc.returncode}:\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


@pytest.mark.parametrize("section", SECTIONS)
def test_section_runs(section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # modules written by '# file:' blocks import from here
    (tmp_path / "experiments").symlink_to(ROOT / "experiments", target_is_directory=True)
    namespace: dict[str, object] = {"__name__": "__guide__"}
    ran = 0
    for block in (b for b in BLOCKS if b.section == section and b.lang in ("python", "bash")):
        if block.not_run_reason is not None:
            continue
        if block.lang == "bash":
            run_bash(block, tmp_path)
        elif block.file_name is not None:
            compile(block.code, block.where, "exec")
            (tmp_path / block.file_name).write_text(block.code, encoding="utf-8")
        else:
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - the guide's own code
        ran += 1
    assert ran, f"section {section!r} has no runnable block"


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=[b.where for b in NOT_RUN_BLOCKS])
def test_not_run_block_compiles_and_its_fluxguide_imports_exist(block: Block) -> None:
    tree = ast.parse(block.code, filename=block.where)
    imports = [
        node for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fluxguide"
        or isinstance(node, ast.Import) and all(a.name.split(".")[0] == "fluxguide" for a in node.names)
    ]
    exec(compile(ast.Module(body=imports, type_ignores=[]), block.where, "exec"), {})  # noqa: S102
    pytest.skip(f"{block.where}: {block.not_run_reason} (compiled, fluxguide imports checked)")
