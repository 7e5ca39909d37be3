"""Experiment tracking shared by every training script: one W&B run plus a local ``metrics.jsonl``.

Every algorithm logs under one metric namespace, with the number of samples seen as the x-axis, so runs of
reward-gradient, PPO and behaviour cloning overlay in one W&B dashboard (docs/design.md, "harness")::

    train/reward_mean, train/reward_std, ...     what the training batches scored
    eval/verifier_pass_rate, eval/reward_mean    periodic evaluation on held-out prompts
    losses/<term>                                each named loss term (losses/loss_reward, ...)
    charts/samples_seen                          the x-axis: images generated for training so far
    perf/<name>                                  timings and throughput (perf/seconds_per_update, ...)

W&B runs offline unless asked otherwise: the mode is the ``mode`` argument if given, else the ``WANDB_MODE``
environment variable, else ``"offline"`` (sync later with ``wandb sync <run_dir>/wandb/offline-run-*``).
Offline, nothing goes to the network (W&B's error reporting is turned off too: :func:`quiet_offline_wandb`).
Every record also goes to ``<run_dir>/metrics.jsonl`` (one JSON object per line, with ``charts/samples_seen``
in each), so curves can be plotted without W&B; :func:`read_metrics` reads it back.

Resuming: pass ``resume_samples_seen`` (the samples seen at the checkpoint being resumed). Records logged
after that point by the interrupted run are dropped from ``metrics.jsonl`` (the resumed run redoes that
work), and the W&B run id stored in ``<run_dir>/tracking.json`` is reused, so the W&B run continues too.

Usage::

    with Tracker(run_dir, config=asdict(cfg), project="fluxguide", group="reward-gradient") as tracker:
        tracker.log({"train/reward_mean": 0.3, "losses/loss_reward": -0.3}, samples_seen=64)
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from typing_extensions import Self

from fluxguide.distributed import is_main
from fluxguide.errors import UserError
from fluxguide.serialization import open_for_writing, refuse_links, write_json_atomic, write_text_atomic

#: The x-axis of every metric: training samples (generated images) seen so far.
SAMPLES_SEEN = "charts/samples_seen"
#: The namespaces a metric name may start with (``"<namespace>/<name>"``).
NAMESPACES: tuple[str, ...] = ("train", "eval", "losses", "charts", "perf")
METRICS_FILE = "metrics.jsonl"
TRACKING_FILE = "tracking.json"
WANDB_MODES: tuple[str, ...] = ("online", "offline", "disabled")


class MetricsFileError(UserError, ValueError):
    """A ``metrics.jsonl`` with a damaged line (not the torn last line a killed writer leaves)."""


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to use: ``mode`` if given, else ``$WANDB_MODE``, else ``"offline"``.

    Raises:
        ValueError: the mode is not one of ``online``, ``offline``, ``disabled``.
    """
    source = "mode argument"
    if mode is None:
        mode, source = os.environ.get("WANDB_MODE") or "offline", "WANDB_MODE"
    mode = mode.strip().lower()
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"W&B mode {mode!r} (from the {source}) is not one of {WANDB_MODES}")
    return mode


def quiet_offline_wandb() -> None:
    """Keep an offline W&B run off the network: turn off W&B's error reporting (Sentry) unless the user set it.

    Offline, W&B's client writes files only, but its service process (``wandb-core``) reports its own internal
    errors to Sentry by default, which would reach the network from a run that asked for none. W&B reads
    ``WANDB_ERROR_REPORTING`` when it starts that process (it is then started with ``--no-observability``).
    What remains is local: a Unix socket to the service, the system monitor reading the network interfaces'
    counters from the kernel (netlink), and ``git`` / ``uname`` subprocesses; ``tests/reliability/test_offline.py``
    checks that no name is looked up and no Internet socket is opened.
    """
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


def check_metric_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is ``"<namespace>/<name>"`` with a namespace of :data:`NAMESPACES`."""
    namespace, sep, rest = name.partition("/")
    if not sep or not rest or namespace not in NAMESPACES:
        raise ValueError(
            f"metric {name!r} is not namespaced: name it '<namespace>/<name>' with a namespace in {NAMESPACES} "
            f"(e.g. 'train/reward_mean', 'losses/{name.replace('/', '_')}') so runs of every algorithm overlay"
        )


def as_number(name: str, value: Any) -> float | int:
    """A Python number from a float, int, bool, numpy scalar or one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # numpy scalars
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r:.60}")
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``<run_dir>/metrics.jsonl``), in order.

    A torn last line (the process was killed while writing it) is skipped; any other line that is not JSON
    (binary garbage included) raises ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    lines = path.read_bytes().splitlines()
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            record = None
        if not isinstance(record, dict):
            if i == len(lines) - 1:
                break
            raise MetricsFileError(
                f"{path} line {i + 1} is not a JSON record: {raw[:80]!r}. The file is damaged: delete or repair that "
                "line (every line is one JSON object), or start the run in a new --run-dir"
            ) from None
        records.append(record)
    return records


def metric_curve(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """``(samples_seen, values)`` of metric ``name`` over ``records`` (as read by :func:`read_metrics`)."""
    xs, ys = [], []
    for r in records:
        if name in r:
            xs.append(r[SAMPLES_SEEN])
            ys.append(r[name])
    return xs, ys


class Tracker:
    """A training run's metric logger: W&B (offline by default) plus ``<run_dir>/metrics.jsonl``.

    Args:
        run_dir: the run folder (created); W&B writes under ``<run_dir>/wandb``.
        config: the run's configuration (JSON-serialisable values), stored with the W&B run.
        project: W&B project.
        group: W&B group, e.g. the algorithm (``"reward-gradient"``), so its runs are grouped.
        name: W&B run name (default: the run folder's name).
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; default ``$WANDB_MODE`` or ``"offline"``.
        resume_samples_seen: resuming from a checkpoint taken at this many samples: keep the W&B run id and
            the records up to it; ``None`` starts afresh (an old ``metrics.jsonl`` is cleared).
        tags: W&B tags.
        active: write anything at all; default: only on the main rank of a data-parallel run
            (:func:`fluxguide.distributed.is_main`), so ``torchrun`` gives one W&B run and one ``metrics.jsonl``.
            An inactive tracker accepts every call (metrics are still checked) and writes nothing.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: Mapping[str, Any] | None = None,
        project: str = "fluxguide",
        group: str | None = None,
        name: str | None = None,
        mode: str | None = None,
        resume_samples_seen: int | None = None,
        tags: tuple[str, ...] = (),
        active: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.mode = resolve_wandb_mode(mode)
        self._start = time.time()
        self.active = is_main() if active is None else active
        self.run = None
        self.wandb_id: str | None = None
        if not self.active:  # another rank of a data-parallel run: rank 0 logs the gathered metrics
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        refuse_links(self.metrics_path)  # a planted link: refused before it is truncated, read or appended to
        self._truncate(resume_samples_seen)
        tracking_path = self.run_dir / TRACKING_FILE
        info = json.loads(tracking_path.read_text()) if tracking_path.is_file() else {}
        if resume_samples_seen is None or "wandb_id" not in info:
            info = {"wandb_id": uuid.uuid4().hex[:12]}
            write_json_atomic(info, tracking_path)
        self.wandb_id = info["wandb_id"]
        if self.mode != "disabled":
            if self.mode == "offline":
                quiet_offline_wandb()
            import wandb

            self.run = wandb.init(
                project=project,
                group=group,
                name=name or self.run_dir.name,
                dir=str(self.run_dir),
                config=dict(config or {}),
                mode=self.mode,
                id=self.wandb_id,
                resume="allow",
                tags=list(tags),
            )
            # Every metric is plotted against samples seen, so algorithms with different batch sizes and
            # update counts overlay (W&B's own step only counts log calls).
            self.run.define_metric(SAMPLES_SEEN)
            self.run.define_metric("*", step_metric=SAMPLES_SEEN)

    def _truncate(self, resume_samples_seen: int | None) -> None:
        """Drop records the resumed run will redo (all of them when starting afresh)."""
        if not self.metrics_path.exists():
            return
        keep = [] if resume_samples_seen is None else [
            r for r in read_metrics(self.metrics_path) if r.get(SAMPLES_SEEN, 0) <= resume_samples_seen
        ]
        write_text_atomic("".join(json.dumps(r) + "\n" for r in keep), self.metrics_path)

    def log(self, metrics: Mapping[str, Any], samples_seen: int) -> dict[str, Any]:
        """Log ``metrics`` (namespaced names -> numbers) at ``samples_seen``; returns the record written.

        Raises:
            ValueError / TypeError: a name outside the namespaces, or a value that is not a number.
        """
        record: dict[str, Any] = {SAMPLES_SEEN: int(samples_seen)}
        for key, value in metrics.items():
            check_metric_name(key)
            record[key] = as_number(key, value)
        record["perf/wall_seconds"] = round(time.time() - self._start, 3)
        self._append(record)
        if self.run is not None:
            self.run.log(record)
        return record

    def log_image(self, name: str, path: str | Path, samples_seen: int, caption: str | None = None) -> None:
        """Log a PNG already written to ``path`` (e.g. a sample grid) under ``name`` at ``samples_seen``.

        ``metrics.jsonl`` gets the path relative to the run folder; W&B gets the image.
        """
        check_metric_name(name)
        path = Path(path)
        try:
            shown = str(path.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            shown = str(path)
        self._append({SAMPLES_SEEN: int(samples_seen), name: shown})
        if self.run is not None:
            import wandb

            self.run.log({SAMPLES_SEEN: int(samples_seen), name: wandb.Image(str(path), caption=caption)})

    def log_table(self, name: str, rows: list[Mapping[str, Any]], samples_seen: int = 0) -> None:
        """Log a table (e.g. the sampler comparison) as a ``wandb.Table``; ``metrics.jsonl`` gets the rows."""
        check_metric_name(name)
        rows = [dict(r) for r in rows]
        self._append({SAMPLES_SEEN: int(samples_seen), name: rows})
        if self.run is not None and rows:
            import wandb

            columns = list(dict.fromkeys(k for r in rows for k in r))
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self.run.log({SAMPLES_SEEN: int(samples_seen), name: table})

    def _append(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open_for_writing(self.metrics_path, "a") as f:  # never through a link planted since
            # NaN / inf are written as JSON's NaN / Infinity (Python's json reads them back): a diverged loss
            # stays visible in the curve.
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def finish(self) -> None:
        """Close the W&B run (idempotent)."""
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if exc_type is None else 1)
            self.run = None


def summarize(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_mean`` and ``{prefix}_std`` of a 1-d tensor of per-sample values (e.g. rewards)."""
    values = values.detach().float().flatten()
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_std": 0.0 if math.isnan(std) else std}
