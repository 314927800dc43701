"""``MetricsFile``: the closing metrics of every Trainer stage as a JSON file, for scripts, CI and dashboards.

After ``fit`` / ``validate`` / ``test``, ``trainer.callback_metrics`` (plus ``data/val_unigram_ppl`` when the data
module offers a ``unigram_perplexity`` baseline) are written to ``<log_dir>/<stage>_metrics.json`` as one flat JSON
object of floats (non-finite values as strings); after ``predict``, the rows the module returned go to
``<log_dir>/predictions.jsonl``, one JSON object per line. Files are written atomically on global rank zero. The
``lightning-llm`` CLI adds this callback to every run; Trainer API users add it themselves:
``L.Trainer(callbacks=[MetricsFile()])``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L

from lightning_llm._io import atomic_write_text

__all__ = ["MetricsFile", "metrics_to_floats"]


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that convert to ``float`` (tensors, numbers), as floats."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class MetricsFile(L.Callback):
    """Write ``<log_dir>/<stage>_metrics.json`` after fit / validate / test and ``predictions.jsonl`` after predict.

    Args:
        dirpath: where to write (default: ``trainer.log_dir``, else ``trainer.default_root_dir``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def _dir(self, trainer: L.Trainer) -> str:
        # `trainer.log_dir` is a collective (broadcast) under DDP / FSDP: every rank must ask
        return self.dirpath or trainer.log_dir or trainer.default_root_dir

    def write(self, trainer: L.Trainer, stage: str) -> str | None:
        """Write ``<stage>_metrics.json`` now (rank zero); returns its path there, ``None`` on other ranks."""
        directory = self._dir(trainer)
        metrics = metrics_to_floats(trainer.callback_metrics)
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "fit" and hasattr(datamodule, "unigram_perplexity"):
            metrics["data/val_unigram_ppl"] = float(datamodule.unigram_perplexity("val"))
        if not trainer.is_global_zero:
            return None
        path = os.path.join(directory, f"{stage}_metrics.json")
        safe = {k: (v if math.isfinite(v) else str(v)) for k, v in sorted(metrics.items())}
        atomic_write_text(path, json.dumps(safe, indent=2) + "\n")
        print(f"[lightning-llm] {stage} metrics written to {path}")
        return path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.write(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "test")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = self._dir(trainer)
        if not trainer.is_global_zero:
            return
        rows = [row for batch in (trainer.predict_loop.predictions or []) for row in _as_rows(batch)]
        path = os.path.join(directory, "predictions.jsonl")
        atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))
        print(f"[lightning-llm] {len(rows)} predictions written to {path}")


def _as_rows(batch: Any) -> list[Any]:
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]
