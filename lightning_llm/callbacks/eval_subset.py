"""``EvalSubsetMonitor``: evaluate named subsets every N training steps and log their metrics.

For each subset ``name`` (an iterable of batches: a DataLoader or a list) the callback runs the module in eval mode
without gradients and logs ``<prefix>/<name>/loss`` (mean next-token cross-entropy), ``.../ppl`` and ``.../acc``
(top-1 next-token accuracy), all over the scored tokens (``targets != ignore_index``), so a regression on a key
subset shows up while training, not at the end.

From YAML, a subset may be named instead of given as an object: ``subsets: {prose: embedded, notes: data/notes.txt}``
(``"embedded"`` is the packaged corpus's ``split``, a local .txt/.md/.jsonl file, or a Hugging Face dataset name), cut
into ``max_batches`` batches of ``batch_size`` x ``seq_len`` tokens with the module's or the datamodule's tokenizer.

Notation: B batch, T tokens, V vocabulary, N scored tokens of a subset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    BatchFn,
    TextDataCallback,
    check_dataset,
    default_batch_fn,
    eval_mode,
    iter_batches,
    log_step_metrics,
)
from lightning_llm.ops import IGNORE_INDEX, token_logprobs


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
        logits, targets = batch_fn(module, batch)  # (B, T, V), (B, T)
        targets = targets.to(logits.device)
        valid = targets != ignore_index  # (B, T)
        nll -= float(token_logprobs(logits, targets, ignore_index).sum(dtype=torch.float64))
        hits += int((logits.argmax(-1) == targets)[valid].sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("The subset has no scored token (all targets equal ignore_index, or no batch).")
    return {"loss": nll / count, "ppl": math.exp(nll / count), "acc": hits / count, "tokens": float(count)}


class EvalSubsetMonitor(TextDataCallback):
    """Evaluate named subsets every ``every_n_steps`` optimizer steps (and at the end of training).

    Args:
        subsets: ``{name: batches}``; batches are whatever ``batch_fn`` reads (default: dicts with ``input_ids`` and
            ``targets``, or ``(inputs, targets)`` tuples); or ``{name: dataset}`` with a dataset name or path.
        every_n_steps: evaluation period in optimizer steps.
        batch_fn: ``(module, batch) -> (logits (B, T, V), targets (B, T))``.
        prefix: log-key prefix.
        max_batches: evaluate at most this many batches per subset.
        ignore_index: target value that is not scored.
        split: split of named datasets ("val"/"test"/"train" for "embedded").
        seq_len: tokens per row of named datasets.
        batch_size: rows per batch of named datasets.
        tokenizer: for named datasets: an object or a directory; default: the module's, else the datamodule's.

    Attributes:
        history: ``[(step, {name: metrics})]`` of every evaluation.
    """

    def __init__(
        self,
        subsets: Mapping[str, Any],
        every_n_steps: int = 100,
        batch_fn: BatchFn | None = None,
        prefix: str = "subset",
        max_batches: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        split: str = "val",
        seq_len: int = 128,
        batch_size: int = 8,
        tokenizer: Any = None,
    ) -> None:
        if not isinstance(subsets, Mapping) or not subsets:
            raise ValueError(
                f"`subsets` must be a non-empty mapping name -> batches, got {type(subsets).__name__}; "
                "e.g. {'code': code_loader, 'prose': prose_loader}."
            )
        super().__init__(every_n_steps, split, seq_len, batch_size, max_batches, tokenizer)
        for name, value in subsets.items():
            if isinstance(value, str):
                check_dataset(f"subsets[{name!r}]", value)
        self.subsets, self.prefix = dict(subsets), prefix
        self.batch_fn = batch_fn or default_batch_fn
        self.ignore_index = ignore_index
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        """Evaluate every subset now and log the metrics."""
        for name, value in self.subsets.items():
            if isinstance(value, str):  # a named dataset: built once
                self.subsets[name] = self._text_batches(value, trainer, pl_module)[0]
        with eval_mode(pl_module):
            results = {
                name: subset_metrics(pl_module, batches, self.batch_fn, self.ignore_index, self.max_batches)
                for name, batches in self.subsets.items()
            }
        step = trainer.global_step
        flat = {f"{self.prefix}/{n}/{k}": v for n, m in results.items() for k, v in m.items() if k != "tokens"}
        log_step_metrics(trainer, flat)
        self.history.append((step, results))
        self._last_run_step = step
        return results

    def on_due_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_once(trainer, pl_module)
