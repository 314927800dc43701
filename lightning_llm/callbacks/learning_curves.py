"""``LearningCurves``: plot the logged metrics (the CSVLogger's ``metrics.csv``) to a PNG in the log dir at fit end.

Works with any LightningModule that logs through a ``CSVLogger`` (or any logger that writes ``metrics.csv`` in its
``log_dir``). One subplot per metric, against the ``step`` column; metrics logged once per epoch and per step are
drawn as markers and lines respectively. Runs on global rank zero only.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["LearningCurves", "plot_metrics_csv"]


def _read_columns(path: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step = float(row.get("step") or "nan")
            except ValueError:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v) and math.isfinite(step):
                    series.setdefault(key, []).append((step, v))
    return series


def plot_metrics_csv(
    csv_path: str, png_path: str, metrics: Sequence[str] | None = None, title: str | None = None
) -> str | None:
    """Plot the columns of a Lightning ``metrics.csv`` (one subplot each) to ``png_path``.

    Args:
        csv_path: the CSV written by ``CSVLogger``.
        png_path: the image to write.
        metrics: the columns to plot, in order; default every numeric column but ``step`` / ``epoch``.
        title: figure title.

    Returns:
        ``png_path``, or ``None`` when there was nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_columns(csv_path)
    names = [m for m in (metrics or sorted(series)) if m in series]
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = sorted(series[name])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class LearningCurves(Callback):
    """Write ``learning_curves.png`` (and keep ``metrics.csv``) in the logger's log dir when fit ends.

    Args:
        metrics: the metric names to plot (default: all logged numeric metrics).
        filename: the image name inside the log dir.
    """

    def __init__(self, metrics: list[str] | None = None, filename: str = "learning_curves.png") -> None:
        self.metrics = metrics
        self.filename = filename
        self.path: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir is None:
                continue
            logger.save()
            csv_path = os.path.join(log_dir, "metrics.csv")
            if os.path.isfile(csv_path):
                self.path = plot_metrics_csv(
                    csv_path, os.path.join(log_dir, self.filename), self.metrics, title=type(pl_module).__name__
                )
                return
