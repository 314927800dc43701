"""``PerplexityMonitor``: perplexity (and bits per byte) of any LightningModule, without touching its code.

During each validation epoch the callback runs ``batch_fn`` on every validation batch (one extra forward pass) and
accumulates a :class:`~lightning_llm.metrics.Perplexity` (float64 sums, synchronised across processes); at the epoch
end it logs ``<name>`` = ``exp(total NLL / scored tokens)``. Given ``bytes_fn(batch) -> int`` (UTF-8 bytes covered by
the batch's scored tokens) it also logs ``<name>_bits_per_byte`` = ``NLL / (ln 2 * bytes)``. With ``dataloader`` and
``every_n_steps`` it evaluates that data every N training steps as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    IGNORE_INDEX,
    BatchFn,
    check_every,
    default_batch_fn,
    eval_mode,
    is_due,
    iter_batches,
    log_step_metrics,
)


class PerplexityMonitor(L.Callback):
    """Log perplexity of validation batches (and of an optional extra dataloader every N steps).

    Args:
        name: the log key (default ``val/ppl_monitor``).
        batch_fn: ``(module, batch) -> (logits (B, T, V), targets (B, T))``.
        dataloader: extra data evaluated every ``every_n_steps`` training steps (logged as ``<name>_data``).
        every_n_steps: period for ``dataloader``.
        bytes_fn: ``batch -> number of UTF-8 bytes`` covered by the batch's scored tokens, for bits per byte.
        ignore_index: target value that is not scored.
        on_validation: also measure the trainer's validation batches.

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
    ) -> None:
        check_every("every_n_steps", every_n_steps)
        if (dataloader is None) != (every_n_steps is None):
            raise ValueError("`dataloader` and `every_n_steps` go together: give both (or neither).")
        from lightning_llm.metrics.perplexity import Perplexity

        self.name = name
        self.batch_fn = batch_fn or default_batch_fn
        self.dataloader = dataloader
        self.every_n_steps = every_n_steps
        self.bytes_fn = bytes_fn
        self.on_validation = on_validation
        self.metric = Perplexity(ignore_index=ignore_index)
        self._bytes = 0
        self.last: dict[str, float] = {}

    def _reset(self, device: torch.device) -> None:
        self.metric = self.metric.to(device)
        self.metric.reset()
        self._bytes = 0

    @torch.no_grad()
    def _update(self, pl_module: L.LightningModule, batch: Any) -> None:
        logits, targets = self.batch_fn(pl_module, batch)
        self.metric.update(logits.float(), targets)
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
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking or int(self.metric.count) == 0:
            return
        values = self._values(trainer)
        pl_module.log(self.name, values["ppl"])
        if "bits_per_byte" in values:
            pl_module.log(f"{self.name}_bits_per_byte", values["bits_per_byte"])
        self.last = values

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.dataloader is None or not is_due(trainer.global_step, self.every_n_steps):
            return
        with eval_mode(pl_module):
            self._reset(pl_module.device)
            for batch in iter_batches(self.dataloader, pl_module.device):
                self._update(pl_module, batch)
        values = self._values(trainer)
        metrics = {f"{self.name}_data": values["ppl"]}
        if "bits_per_byte" in values:
            metrics[f"{self.name}_data_bits_per_byte"] = values["bits_per_byte"]
        log_step_metrics(trainer, metrics)
        self.last = values
        self.metric.reset()
