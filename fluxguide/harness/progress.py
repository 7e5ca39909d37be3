"""Progress a process outside the run can read: each update of every training run, shown per lane by the jobs
that run several (``experiments/compare.py``, ``experiments/reward_study.py``).

A training run (:class:`~fluxguide.harness.run.Run`) and a collection write ``progress.json`` in their folder after
every update or batch (:func:`write_progress`: what runs, update k of n, the last held-out pass rate), atomically,
so a reader never sees half a file. :class:`LaneDisplay` polls the folders of the runs in flight and shows one bar
per lane that moves with every update, not one that counts finished runs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm
from typing_extensions import Self

from fluxguide.serialization import write_text_atomic

PROGRESS_FILE = "progress.json"


def write_progress(folder: str | Path, *, stage: str, done: int, total: int, unit: str = "updates",
                   heldout_pass_rate: float | None = None) -> None:
    """Record in ``<folder>/progress.json`` that ``stage`` has done ``done`` of ``total`` ``unit``."""
    record: dict[str, Any] = {"stage": stage, "done": done, "total": total, "unit": unit}
    if heldout_pass_rate is not None:
        record["heldout_pass_rate"] = heldout_pass_rate
    write_text_atomic(json.dumps(record), Path(folder) / PROGRESS_FILE)


def read_progress(folders: Sequence[str | Path]) -> dict[str, Any] | None:
    """The most recently written ``progress.json`` of ``folders`` (searched one level down too: a collection
    writes into its per-seed metrics folder), ``None`` if none has one yet or it cannot be read."""
    found = [p for folder in map(Path, folders) for p in (folder / PROGRESS_FILE, *folder.glob(f"*/{PROGRESS_FILE}"))
             if p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # replaced while read: take the next
            continue
    return None


def describe(progress: dict[str, Any] | None) -> str:
    """One lane's line: stage, done of total, the last held-out pass rate."""
    if progress is None:
        return "starting"
    line = f"{progress['stage']}: {progress['done']}/{progress['total']} {progress['unit']}"
    if "heldout_pass_rate" in progress:
        line += f", held-out pass {progress['heldout_pass_rate']:.3f}"
    return line


class LaneDisplay:
    """One progress bar per lane, refreshed every ``interval`` seconds from the runs' ``progress.json``.

    Use as a context manager around the jobs; a job calls :meth:`start` with its label and the folders its stages
    write, and :meth:`stop` when done. ``disable`` turns the bars off (a test, or output to a file).
    """

    def __init__(self, lanes: int, *, interval: float = 1.0, disable: bool = False) -> None:
        self.interval, self.disable = interval, disable
        self.bars = [tqdm(total=1, position=i + 1, leave=False, disable=disable, bar_format="{desc}")
                     for i in range(lanes)]
        self.jobs: dict[str, list[Path]] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        for bar in self.bars:
            bar.close()

    def start(self, label: str, folders: Sequence[str | Path]) -> None:
        with self.lock:
            self.jobs[label] = [Path(f) for f in folders]

    def stop(self, label: str) -> None:
        with self.lock:
            self.jobs.pop(label, None)

    def lines(self) -> list[str]:
        """The current line of each job in flight."""
        with self.lock:
            jobs = list(self.jobs.items())
        return [f"{label} | {describe(read_progress(folders))}" for label, folders in jobs]

    def _poll(self) -> None:
        while not self.stopped.wait(self.interval):
            lines = self.lines()
            for i, bar in enumerate(self.bars):
                bar.set_description_str(lines[i] if i < len(lines) else "", refresh=True)

    def run(self, label: str, folders: Sequence[str | Path], job: Callable[[], Any]) -> Any:
        """``job()`` shown as ``label`` while it runs."""
        self.start(label, folders)
        try:
            return job()
        finally:
            self.stop(label)
