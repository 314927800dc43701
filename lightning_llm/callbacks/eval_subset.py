"""``EvalSubsetMonitor``: evaluate named subsets every N training steps and log their metrics.

For each subset ``name`` (an iterable of batches: a DataLoader or a list) the callback runs the module in eval mode
without gradients and logs ``<prefix>/<name>/loss`` (mean next-token cross-entropy), ``.../ppl`` and ``.../acc``
(top-1 next-token accuracy), all over the scored tokens (``targets != ignore_index``), so a regression on a key
subset shows up while training, not at the end.

Notation: B batch, T tokens, V vocabulary, N scored tokens of a subset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lightning_llm.callbacks._utils import (
    IGNORE_INDEX,
    BatchFn,
    check_every,
    default_batch_fn,
    eval_mode,
    flat_scored,
    is_due,
    iter_batches,
    log_step_metrics,
)


@torch.no_grad()
def subset_metrics(
    module: Any,
    batches: Iterable[Any],
    batch_fn: BatchFn = default_batch_fn,
    ignore_index: int = IGNORE_INDEX,
    max_batches: int | None = None,
) -> dict[str, float]:
    """``{"loss", "ppl", "acc", "tokens"}`` of ``module`` over ``batches`` (token-weighted, float64 sums)."""
    nll, hits, count = 0.0, 0, 0
    device = getattr(module, "device", torch.device("cpu"))
    for batch in iter_batches(batches, device, max_batches):
        logits, targets = batch_fn(module, batch)
        flat, tgt, valid = flat_scored(logits, targets, ignore_index)  # (B*T, V), (B*T,), (B*T,)
        nll += float(F.cross_entropy(flat, tgt, ignore_index=ignore_index, reduction="sum").double())
        hits += int((flat.argmax(-1)[valid] == tgt[valid]).sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("The subset has no scored token (all targets equal ignore_index, or no batch).")
    return {"loss": nll / count, "ppl": math.exp(nll / count), "acc": hits / count, "tokens": float(count)}


class EvalSubsetMonitor(L.Callback):
    """Evaluate named subsets every ``every_n_steps`` optimizer steps (and at the end of training).

    Args:
        subsets: ``{name: batches}``; batches are whatever ``batch_fn`` reads (default: dicts with ``input_ids`` and
            ``targets``, or ``(inputs, targets)`` tuples).
        every_n_steps: evaluation period in optimizer steps.
        batch_fn: ``(module, batch) -> (logits (B, T, V), targets (B, T))``.
        prefix: log-key prefix.
        max_batches: evaluate at most this many batches per subset.
        ignore_index: target value that is not scored.

    Attributes:
        history: ``[(step, {name: metrics})]`` of every evaluation.
    """

    def __init__(
        self,
        subsets: Mapping[str, Iterable[Any]],
        every_n_steps: int = 100,
        batch_fn: BatchFn | None = None,
        prefix: str = "subset",
        max_batches: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not isinstance(subsets, Mapping) or not subsets:
            raise ValueError(
                f"`subsets` must be a non-empty mapping name -> batches, got {type(subsets).__name__}; "
                "e.g. {'code': code_loader, 'prose': prose_loader}."
            )
        check_every("every_n_steps", every_n_steps)
        self.subsets = dict(subsets)
        self.every_n_steps = every_n_steps
        self.batch_fn = batch_fn or default_batch_fn
        self.prefix = prefix
        self.max_batches = max_batches
        self.ignore_index = ignore_index
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []
        self._last_step = -1

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        """Evaluate every subset now and log the metrics."""
        with eval_mode(pl_module):
            results = {
                name: subset_metrics(pl_module, batches, self.batch_fn, self.ignore_index, self.max_batches)
                for name, batches in self.subsets.items()
            }
        step = trainer.global_step
        flat = {f"{self.prefix}/{n}/{k}": v for n, m in results.items() for k, v in m.items() if k != "tokens"}
        log_step_metrics(trainer, flat)
        self.history.append((step, results))
        self._last_step = step
        return results

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if is_due(step, self.every_n_steps) and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)
