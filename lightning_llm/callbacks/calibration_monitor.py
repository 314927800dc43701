"""``CalibrationMonitor``: calibration error plus a reliability diagram, logged as an image.

Two sources of (confidence, correct) pairs:

* **tokens** (default): each scored validation token gives ``confidence = max softmax probability`` and
  ``correct = [argmax == target]``; an extra forward pass per validation batch through ``batch_fn``;
* **multiple choice**: with ``examples`` (``MultipleChoiceExample``) and a ``tokenizer``, each item is scored per
  choice at every validation end and HELM's confidence (max softmax over the choices) is used.

Logged at each validation end: ``<prefix>/ece`` (equal-width bins, as torchmetrics' ``CalibrationError``),
``<prefix>/ece_10_bin`` and ``<prefix>/ece_1_bin`` (HELM's equal-mass ECE and ``|mean conf - acc|``, on at most
``max_instances`` instances drawn with a fixed seed), ``<prefix>/acc``; the reliability diagram goes to the logger
when it takes images (W&B, TensorBoard), else to ``<log_dir>/<prefix>_reliability/step_*.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    IGNORE_INDEX,
    BatchFn,
    ForwardFn,
    default_batch_fn,
    default_forward_fn,
    eval_mode,
    flat_scored,
    log_figure,
)


class CalibrationMonitor(L.Callback):
    """Track calibration of next-token (or multiple-choice) predictions at every validation end.

    Args:
        batch_fn: ``(module, batch) -> (logits, targets)`` for token calibration.
        examples: multiple-choice items; switches to multiple-choice calibration (needs ``tokenizer``).
        tokenizer: the model's tokenizer, for ``examples``.
        forward_fn: ``(module, input_ids) -> logits`` for ``examples``.
        num_bins: bins of the equal-width ECE and of the diagram.
        max_instances: instances kept per epoch for HELM's ECE and the diagram (random subsample, seeded).
        prefix: log-key prefix.
        log_diagram: log the reliability diagram.
        seed: subsampling seed.

    Attributes:
        last: the last logged values; ``last_figure_path`` where the last diagram went.
    """

    def __init__(
        self,
        batch_fn: BatchFn | None = None,
        examples: Sequence[Any] | None = None,
        tokenizer: Any = None,
        forward_fn: ForwardFn | None = None,
        num_bins: int = 10,
        max_instances: int = 20000,
        prefix: str = "calibration",
        log_diagram: bool = True,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if examples is not None and tokenizer is None:
            raise ValueError("`examples` (multiple choice) need the model's `tokenizer` to encode the choices.")
        self.batch_fn = batch_fn or default_batch_fn
        self.examples = list(examples) if examples is not None else None
        self.tokenizer = tokenizer
        self.forward_fn = forward_fn or default_forward_fn
        self.num_bins = num_bins
        self.max_instances = max_instances
        self.prefix = prefix
        self.log_diagram = log_diagram
        self.seed = seed
        self.ignore_index = ignore_index
        self._conf: list[torch.Tensor] = []
        self._corr: list[torch.Tensor] = []
        self.last: dict[str, float] = {}
        self.last_figure_path: str | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._conf, self._corr = [], []

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.examples is not None or trainer.sanity_checking:
            return
        logits, targets = self.batch_fn(pl_module, batch)
        flat, tgt, valid = flat_scored(logits, targets, self.ignore_index)  # (B*T, V), (B*T,), (B*T,)
        probs = flat[valid].softmax(-1)
        conf, pred = probs.max(-1)
        self._conf.append(conf.double().cpu())
        self._corr.append((pred == tgt[valid]).long().cpu())

    def _multiple_choice(self, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        from lightning_llm.evaluation.tasks import evaluate_multiple_choice

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return self.forward_fn(pl_module, ids.to(pl_module.device)).float().cpu()

        with eval_mode(pl_module), torch.no_grad():
            res = evaluate_multiple_choice(logits, self.tokenizer, self.examples)
        return torch.tensor(res["confidence"], dtype=torch.float64), torch.tensor(res["correct"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.examples is not None:
            conf, corr = self._multiple_choice(pl_module)
        elif self._conf:
            conf, corr = torch.cat(self._conf), torch.cat(self._corr)
        else:
            return
        from lightning_llm.metrics.functional.calibration import expected_calibration_error, helm_calibration

        values = {"ece": float(expected_calibration_error(conf, corr, num_bins=self.num_bins))}
        if conf.numel() > self.max_instances:
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(conf.numel(), generator=gen)[: self.max_instances]
            conf, corr = conf[keep], corr[keep]
        helm = helm_calibration(conf, corr)
        values.update(
            {"ece_10_bin": helm["ece_10_bin"], "ece_1_bin": helm["ece_1_bin"], "acc": float(corr.double().mean())}
        )
        for key, value in values.items():
            pl_module.log(f"{self.prefix}/{key}", value)
        self.last = values
        if self.log_diagram:
            from lightning_llm.metrics.plot import plot_reliability_diagram

            fig = plot_reliability_diagram(conf, corr, num_bins=self.num_bins)
            self.last_figure_path = log_figure(trainer, f"{self.prefix}_reliability", fig, trainer.global_step)
