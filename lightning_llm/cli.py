"""The ``lightning-llm`` command: a LightningCLI with linked vocabulary sizes and JSON metric files.

``lightning-llm fit|validate|test|predict --config configs/quickstart.yaml [--config more.yaml] [--key value]``.
Model and data are given by ``class_path`` (any LightningModule / LightningDataModule). After each stage the final
``trainer.callback_metrics`` are written as a flat JSON object of floats to ``<log_dir>/<stage>_metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_llm.checkpoint import atomic_write_text


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def write_metrics(trainer: L.Trainer, stage: str, extra: dict[str, float] | None = None) -> str | None:
    """Write ``trainer.callback_metrics`` (plus ``extra``) to ``<log_dir>/<stage>_metrics.json`` on rank zero."""
    log_dir = trainer.log_dir or trainer.default_root_dir  # a collective (broadcast) under DDP/FSDP: all ranks call it
    if not trainer.is_global_zero:
        return None
    metrics = metrics_to_floats(trainer.callback_metrics)
    metrics.update(extra or {})
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{stage}_metrics.json")
    safe = {k: (v if math.isfinite(v) else str(v)) for k, v in sorted(metrics.items())}
    atomic_write_text(path, json.dumps(safe, indent=2) + "\n")
    return path


class LightningLLMCLI(LightningCLI):
    """LightningCLI subclass: links ``data.vocab_size`` to ``model.init_args.vocab_size`` and writes metric files."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def _finish(self, stage: str, extra: dict[str, float] | None = None) -> None:
        path = write_metrics(self.trainer, stage, extra)
        if path is not None:
            print(f"[lightning-llm] {stage} metrics written to {path}")

    def after_fit(self) -> None:
        extra: dict[str, float] = {}
        trainer, datamodule = self.trainer, self.datamodule
        if trainer.interrupted:
            return self._finish("fit")
        # a final validation of the trained weights, so fit always reports its closing validation perplexity
        if trainer.limit_val_batches != 0 and datamodule is not None and hasattr(datamodule, "val_dataloader"):
            fit_metrics = dict(trainer.callback_metrics)
            trainer.validate(self.model, datamodule=datamodule, verbose=False)
            fit_metrics.update(trainer.callback_metrics)
            trainer.callback_metrics.update(fit_metrics)
        tokenizer = getattr(datamodule, "tokenizer", None)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and hasattr(tokenizer, "save"):  # the tokenizer travels beside the checkpoints
            tokenizer.save(os.path.join(log_dir, "tokenizer"))
        if hasattr(datamodule, "unigram_perplexity"):
            extra["data/val_unigram_ppl"] = float(datamodule.unigram_perplexity("val"))
        self._finish("fit", extra)
        if trainer.is_global_zero and "val/ppl" in trainer.callback_metrics:
            line = f"[lightning-llm] validation perplexity {float(trainer.callback_metrics['val/ppl']):.2f}"
            if "data/val_unigram_ppl" in extra:
                line += f" (unigram baseline {extra['data/val_unigram_ppl']:.2f})"
            print(line)

    def after_validate(self) -> None:
        self._finish("validate")

    def after_test(self) -> None:
        self._finish("test")

    def after_predict(self) -> None:
        """Write the predictions (one JSON object per prompt) to ``<log_dir>/predictions.jsonl``."""
        trainer = self.trainer
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        rows = [row for batch in (trainer.predict_loop.predictions or []) for row in batch]
        path = os.path.join(log_dir, "predictions.jsonl")
        atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))
        print(f"[lightning-llm] {len(rows)} predictions written to {path}")


def main(args: list[str] | None = None) -> LightningLLMCLI:
    return LightningLLMCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
