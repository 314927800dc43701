"""``CalibrationMonitor``: calibration error plus a reliability diagram, logged as an image.

Two sources of (confidence, correct) pairs:

* **tokens** (default): each scored validation token gives ``confidence = max softmax probability`` and
  ``correct = [argmax == target]``; an extra forward pass per validation batch through ``batch_fn``;
* **multiple choice**: with ``examples`` (``MultipleChoiceExample``) and a ``tokenizer``, each item is scored per
  choice at every validation end and HELM's confidence (max softmax over the choices) is used. From YAML, name them
  with ``dataset`` (``"embedded"``: the packaged sentence-ending task; or a local .jsonl of
  ``{question, choices, answer}``) and ``limit``; the tokenizer defaults to the module's or the datamodule's.

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
    BatchFn,
    ForwardFn,
    check_dataset,
    default_batch_fn,
    default_forward_fn,
    eval_mode,
    log_figure,
    resolve_tokenizer,
)
from lightning_llm.ops import IGNORE_INDEX, token_logprobs


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
        seed: subsampling seed (and the embedded task's).
        dataset: multiple-choice items by name instead of ``examples``: "embedded" or a local .jsonl.
        limit: items of ``dataset``.

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
        dataset: str | None = None,
        limit: int = 100,
    ) -> None:
        if examples is not None and tokenizer is None:
            raise ValueError("`examples` (multiple choice) need the model's `tokenizer` to encode the choices.")
        if examples is not None and dataset is not None:
            raise ValueError("Give `examples` (objects) or `dataset` (by name), not both.")
        check_dataset("dataset", dataset)
        self.dataset, self.limit, self.tokenizer = dataset, limit, tokenizer
        self.examples = list(examples) if examples is not None else None
        self.batch_fn = batch_fn or default_batch_fn
        self.forward_fn = forward_fn or default_forward_fn
        self.num_bins, self.max_instances, self.seed = num_bins, max_instances, seed
        self.prefix, self.log_diagram, self.ignore_index = prefix, log_diagram, ignore_index
        self._conf: list[torch.Tensor] = []
        self._corr: list[torch.Tensor] = []
        self.last: dict[str, float] = {}
        self.last_figure_path: str | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._conf, self._corr = [], []

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        if self.examples is not None or self.dataset is not None or trainer.sanity_checking:
            return
        logits, targets = self.batch_fn(pl_module, batch)  # (B, T, V), (B, T)
        valid = targets.to(logits.device) != self.ignore_index  # (B, T)
        pred = logits.argmax(-1)  # (B, T)
        conf = token_logprobs(logits, torch.where(valid, pred, IGNORE_INDEX)).exp()  # max softmax probability
        self._conf.append(conf[valid].double().cpu())
        self._corr.append((pred == targets.to(pred.device))[valid].long().cpu())

    def _multiple_choice(self, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        from lightning_llm.evaluation import tasks
        from lightning_llm.evaluation.tasks import evaluate_multiple_choice

        if self.examples is None:  # named dataset: read once
            if self.dataset == "embedded":
                self.examples = tasks.embedded_multiple_choice(self.limit, seed=self.seed)
            else:
                self.examples = tasks.load_multiple_choice(self.dataset, limit=self.limit)
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = resolve_tokenizer(self.tokenizer, self._trainer, pl_module, "CalibrationMonitor")

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return self.forward_fn(pl_module, ids.to(pl_module.device)).float().cpu()

        with eval_mode(pl_module), torch.no_grad():
            res = evaluate_multiple_choice(logits, self.tokenizer, self.examples)
        return torch.tensor(res["confidence"], dtype=torch.float64), torch.tensor(res["correct"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.examples is not None or self.dataset is not None:
            self._trainer = trainer
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
