"""``LambadaMonitor``: LAMBADA accuracy and perplexity (lm-evaluation-harness definitions) during training.

Passages are split and encoded once with :func:`lightning_llm.data.lambada.encode_lambada` (context = all words but
the last, target = ``" " + last word``); every ``every_n_steps`` steps (and at each validation end, if asked) the
callback scores them with :class:`~lightning_llm.metrics.LambadaAccuracy` and logs ``<prefix>/acc`` (all target
tokens greedy) and ``<prefix>/ppl`` (``exp(-mean summed target log-probability)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    IGNORE_INDEX,
    ForwardFn,
    check_every,
    default_forward_fn,
    eval_mode,
    is_due,
    log_step_metrics,
)


class LambadaMonitor(L.Callback):
    """Score LAMBADA-style passages every N steps.

    Args:
        texts: passages (the last word is the target); e.g. ``read_lambada_jsonl(path)`` or
            ``lightning_llm.evaluation.tasks.embedded_cloze_texts()``.
        tokenizer: the model's tokenizer (``encode``, ``encode_batch``, ``eos_id``, ``pad_id``).
        every_n_steps: period in training steps; ``None``: only at validation ends.
        forward_fn: ``(module, input_ids (B, T)) -> logits (B, T, V)``.
        max_length: longest model input (harness left truncation).
        batch_size: passages per forward pass.
        prefix: log-key prefix.
        on_validation_end: also score after every validation epoch.
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        every_n_steps: int | None = 500,
        forward_fn: ForwardFn | None = None,
        max_length: int = 1024,
        batch_size: int = 16,
        prefix: str = "lambada",
        on_validation_end: bool = False,
    ) -> None:
        from lightning_llm.data.lambada import encode_lambada

        check_every("every_n_steps", every_n_steps)
        if isinstance(texts, str) or not texts:
            raise ValueError("`texts` must be a non-empty list of passages (strings).")
        self.examples = encode_lambada(list(texts), tokenizer, max_length)
        self.pad_id = tokenizer.pad_id
        self.every_n_steps = every_n_steps
        self.forward_fn = forward_fn or default_forward_fn
        self.batch_size = batch_size
        self.prefix = prefix
        self.on_val_end = on_validation_end
        self.history: list[tuple[int, dict[str, float]]] = []

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from lightning_llm.data.lambada import collate_lambada

        for start in range(0, len(self.examples), self.batch_size):
            batch = collate_lambada(self.examples[start : start + self.batch_size], self.pad_id)
            yield batch["input_ids"], batch["targets"]  # (B, T) right-padded, (B, T) IGNORE_INDEX off target

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score every passage now and log ``acc`` and ``ppl``."""
        from lightning_llm.metrics.lambada import LambadaAccuracy

        metric = LambadaAccuracy(ignore_index=IGNORE_INDEX, sync_on_compute=False).to(pl_module.device)
        with eval_mode(pl_module):
            for ids, targets in self._batches():
                ids, targets = ids.to(pl_module.device), targets.to(pl_module.device)
                metric.update(self.forward_fn(pl_module, ids).float(), targets)
        result = {k: float(v) for k, v in metric.compute().items()}
        metrics = {f"{self.prefix}/{k}": v for k, v in result.items()}
        log_step_metrics(trainer, metrics)
        self.history.append((trainer.global_step, result))
        return result

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if is_due(trainer.global_step, self.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_val_end and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module)
