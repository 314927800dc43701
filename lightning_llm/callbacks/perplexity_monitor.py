"""``PerplexityMonitor``: perplexity (and bits per byte) of any LightningModule, without touching its code.

During each validation epoch the callback runs ``batch_fn`` on every validation batch (one extra forward pass) and
accumulates a :class:`~lightning_llm.metrics.Perplexity` (float64 sums, synchronised across processes); at the epoch
end it logs ``<name>`` = ``exp(total NLL / scored tokens)``. Given ``bytes_fn(batch) -> int`` (UTF-8 bytes covered by
the batch's scored tokens) it also logs ``<name>_bits_per_byte`` = ``NLL / (ln 2 * bytes)``. With ``dataloader`` and
``every_n_steps`` it evaluates that data every N training steps as well.

From YAML, no Python object is needed: ``dataset`` names the extra data (``"embedded"``, a local .txt/.md/.jsonl file
or a Hugging Face dataset name), cut into ``max_batches`` batches of ``batch_size`` x ``seq_len`` tokens with the
tokenizer of the module or of the trainer's datamodule (bits per byte are then logged too)::

    trainer:
      callbacks+:
        - class_path: lightning_llm.callbacks.PerplexityMonitor
          init_args: {dataset: embedded, split: test, every_n_steps: 100, seq_len: 128}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    BatchFn,
    TextDataCallback,
    check_dataset,
    default_batch_fn,
    log_step_metrics,
)
from lightning_llm.ops import IGNORE_INDEX


class PerplexityMonitor(TextDataCallback):
    """Log perplexity of validation batches (and of an optional extra dataloader every N steps).

    Args:
        name: the log key (default ``val/ppl_monitor``).
        batch_fn: ``(module, batch) -> (logits (B, T, V), targets (B, T))``.
        dataloader: extra data evaluated every ``every_n_steps`` training steps (logged as ``<name>_data``).
        every_n_steps: period for ``dataloader``.
        bytes_fn: ``batch -> number of UTF-8 bytes`` covered by the batch's scored tokens, for bits per byte.
        ignore_index: target value that is not scored.
        on_validation: also measure the trainer's validation batches.
        dataset: extra data by name instead of ``dataloader``: "embedded", a local .txt/.md/.jsonl file or a Hugging
            Face dataset name; evaluated every ``every_n_steps`` steps, or at each validation end when that is None.
        split: the split of ``dataset`` ("val"/"test"/"train" for "embedded").
        seq_len: tokens per row of the ``dataset`` batches.
        batch_size: rows per ``dataset`` batch.
        max_batches: batches of ``dataset`` evaluated each time.
        tokenizer: for ``dataset``: a tokenizer object or directory; default: the module's, else the datamodule's.

    Attributes:
        last: the last logged values.
    """

    def __init__(
        self,
        name: str = "val/ppl_monitor",
        batch_fn: BatchFn | None = None,
        dataloader: Iterable[Any] | None = None,
        every_n_steps: int | None = None,
        bytes_fn: Callable[[Any], int] | None = None,
        ignore_index: int = IGNORE_INDEX,
        on_validation: bool = True,
        dataset: str | None = None,
        split: str = "val",
        seq_len: int = 128,
        batch_size: int = 8,
        max_batches: int | None = 4,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(every_n_steps, split, seq_len, batch_size, max_batches, tokenizer)
        check_dataset("dataset", dataset)
        if dataset is not None and dataloader is not None:
            raise ValueError("Give `dataset` (by name) or `dataloader` (an object), not both.")
        if dataloader is not None and every_n_steps is None:
            raise ValueError("`dataloader` needs `every_n_steps` (when to evaluate it).")
        if dataloader is None and dataset is None and every_n_steps is not None:
            raise ValueError("`every_n_steps` evaluates `dataloader` or `dataset`: give one of them (or neither).")
        from lightning_llm.metrics.perplexity import Perplexity

        self.name, self.on_validation, self.bytes_fn = name, on_validation, bytes_fn
        self.dataset, self.dataloader = dataset, dataloader
        self.batch_fn = batch_fn or default_batch_fn
        self.metric = Perplexity(ignore_index=ignore_index)
        self._data_bytes_fn: Callable[[Any], int] | None = None
        self._bytes = 0
        self.last: dict[str, float] = {}

    def _reset(self, device: torch.device) -> None:
        self.metric = self.metric.to(device)
        self.metric.reset()
        self._bytes = 0

    @torch.no_grad()
    def _update(self, pl_module: L.LightningModule, batch: Any) -> None:
        logits, targets = self.batch_fn(pl_module, batch)
        self.metric.update(logits, targets)
        if self.bytes_fn is not None:
            self._bytes += int(self.bytes_fn(batch))

    def _values(self, trainer: L.Trainer) -> dict[str, float]:
        values = {"ppl": float(self.metric.compute())}
        if self.bytes_fn is not None:
            n_bytes = float(trainer.strategy.reduce(torch.tensor(float(self._bytes)), reduce_op="sum"))
            values["bits_per_byte"] = float(self.metric.nll_sum) / (math.log(2.0) * max(n_bytes, 1.0))
        return values

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module.device)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._update(pl_module, batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dataset is not None and self.every_n_steps is None and not trainer.sanity_checking:
            self.run_once(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking or int(self.metric.count) == 0:
            return
        values = self._values(trainer)
        pl_module.log(self.name, values["ppl"])
        if "bits_per_byte" in values:
            pl_module.log(f"{self.name}_bits_per_byte", values["bits_per_byte"])
        self.last = values

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The ``dataset`` batches, built once with the resolved tokenizer; bits per byte from their text."""
        self.dataloader, tok = self._text_batches(self.dataset, trainer, pl_module)
        self._data_bytes_fn = lambda batch: len(tok.decode(batch["targets"].flatten().tolist()).encode("utf-8"))

    def on_due_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate ``dataloader`` / ``dataset`` now and log ``<name>_data`` (and its bits per byte)."""
        if self.dataloader is None:
            self._build(trainer, pl_module)
        own_bytes_fn = self.bytes_fn
        self.bytes_fn = self._data_bytes_fn or own_bytes_fn  # the named dataset knows its text
        try:
            self._reset(pl_module.device)
            for batch in self.iter_eval(pl_module, self.dataloader):
                self._update(pl_module, batch)
            values = self._values(trainer)
        finally:
            self.bytes_fn = own_bytes_fn
        metrics = {f"{self.name}_data": values["ppl"]}
        if "bits_per_byte" in values:
            metrics[f"{self.name}_data_bits_per_byte"] = values["bits_per_byte"]
        log_step_metrics(trainer, metrics)
        self.last = values
        self.metric.reset()
