"""Training curves from a run's ``metrics.jsonl`` as a PNG (no W&B needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fluxguide.harness.tracking import metric_curve, read_metrics
from fluxguide.serialization import open_for_writing

#: The default panels: (title, metric names) -- reward, then the held-out verifier pass rate.
DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("train/reward_mean", "eval/reward_mean")),
    ("held-out verifier pass rate", ("eval/verifier_pass_rate",)),
)


def plot_curves(
    run_dir: str | Path,
    panels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS,
    smooth: int = 20,
    path: str | Path | None = None,
) -> Path:
    """Plot metrics against samples seen, one panel per ``(title, names)``; returns the PNG path.

    Per-batch ``train/*`` curves are noisy: from ``smooth`` points on they are shown as a running mean of
    ``smooth`` updates. Default path: ``<run_dir>/curves.png``. A link there is refused, not written through.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            xs, ys = metric_curve(records, name)
            label = name
            if name.startswith("train") and smooth > 1 and len(ys) >= smooth:
                ys = torch.tensor(ys).unfold(0, smooth, 1).mean(1).tolist()
                xs, label = xs[smooth - 1 :], f"{name} (mean of {smooth} updates)"
            if xs:
                ax.plot(xs, ys, marker="." if name.startswith("eval") else None, label=label)
        ax.set_xlabel("samples seen")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    return save_figure(fig, Path(path) if path is not None else run_dir / "curves.png")


def save_figure(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` as a PNG (never through a link) and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with open_for_writing(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
