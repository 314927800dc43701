"""``LambadaMonitor``: LAMBADA accuracy and perplexity (lm-evaluation-harness definitions) during training.

Passages are split and encoded once with :func:`lightning_llm.data.lambada.encode_lambada` (context = all words but
the last, target = ``" " + last word``); every ``every_n_steps`` steps (and at each validation end, if asked) the
callback scores them with :func:`lightning_llm.evaluation.tasks.score_lambada` (the
:class:`~lightning_llm.metrics.LambadaAccuracy` metric's own update and compute) and logs ``<prefix>/acc`` (all target
tokens greedy) and ``<prefix>/ppl`` (``exp(-mean summed target log-probability)``).

From YAML: leave ``texts`` out and name the passages with ``path`` (``"embedded"``: LAMBADA-style cloze passages from
the packaged corpus; or a local .jsonl of ``{"text": ...}`` such as OpenAI's ``lambada_test.jsonl``) and ``limit``;
the tokenizer defaults to the module's or the datamodule's, resolved when training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    ForwardFn,
    PeriodicCallback,
    check_dataset,
    check_every,
    default_forward_fn,
    eval_mode,
    log_step_metrics,
    model_max_length,
    resolve_tokenizer,
)


class LambadaMonitor(PeriodicCallback):
    """Score LAMBADA-style passages every N steps.

    Args:
        texts: passages (the last word is the target); e.g. ``read_lambada_jsonl(path)`` or
            ``lightning_llm.evaluation.tasks.embedded_cloze_texts()``; None: read them from ``path``.
        tokenizer: the model's tokenizer (``encode``, ``encode_batch``, ``eos_id``, ``pad_id``) or its directory;
            default: the module's, else the datamodule's.
        every_n_steps: period in training steps; ``None``: only at validation ends.
        forward_fn: ``(module, input_ids (B, T)) -> logits (B, T, V)``.
        max_length: longest model input (harness left truncation).
        batch_size: passages per forward pass.
        prefix: log-key prefix.
        on_validation_end: also score after every validation epoch.
        path: where the passages come from when ``texts`` is None: "embedded" or a local LAMBADA .jsonl.
        limit: the first ``limit`` passages of ``path`` (None: all).
    """

    def __init__(
        self,
        texts: Sequence[str] | None = None,
        tokenizer: Any = None,
        every_n_steps: int | None = 500,
        forward_fn: ForwardFn | None = None,
        max_length: int = 1024,
        batch_size: int = 16,
        prefix: str = "lambada",
        on_validation_end: bool = False,
        path: str = "embedded",
        limit: int | None = 200,
    ) -> None:
        check_every("every_n_steps", every_n_steps)
        check_every("limit", limit)
        if texts is not None and (isinstance(texts, str) or not texts):
            raise ValueError("`texts` must be a non-empty list of passages (strings), or None to read `path`.")
        if texts is None:
            check_dataset("path", path)
        self.texts = list(texts) if texts is not None else None
        self.path, self.limit, self.tokenizer = path, limit, tokenizer
        self.examples: list | None = None
        self.max_length = max_length  # the encoded inputs are truncated to it; scoring truncates the same way
        self.pad_id = 0
        if self.texts is not None and tokenizer is not None and not isinstance(tokenizer, str):
            self._encode(tokenizer)
        self.every_n_steps = every_n_steps
        self.forward_fn = forward_fn or default_forward_fn
        self.batch_size = batch_size
        self.prefix = prefix
        self.on_val_end = on_validation_end
        self.history: list[tuple[int, dict[str, float]]] = []

    def _encode(self, tokenizer: Any) -> None:
        from lightning_llm.data.lambada import encode_lambada

        self.examples = encode_lambada(self.texts, tokenizer, self.max_length)
        self.pad_id = tokenizer.pad_id

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the passages and encode them with the resolved tokenizer (once)."""
        if self.texts is None:
            if self.path == "embedded":
                from lightning_llm.evaluation.tasks import embedded_cloze_texts

                self.texts = embedded_cloze_texts(self.limit or 200)
            else:
                from lightning_llm.data.lambada import read_lambada_jsonl

                self.texts = read_lambada_jsonl(self.path)[: self.limit]
        limit = model_max_length(pl_module)
        if limit is not None:
            self.max_length = min(self.max_length, limit)
        self._encode(resolve_tokenizer(self.tokenizer, trainer, pl_module, "LambadaMonitor"))

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score every passage now and log ``acc`` and ``ppl``."""
        from lightning_llm.evaluation.tasks import score_lambada

        if self.examples is None:
            self._prepare(trainer, pl_module)

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return self.forward_fn(pl_module, ids.to(pl_module.device))

        with eval_mode(pl_module):
            result = score_lambada(logits, self.examples, self.max_length, self.batch_size, self.pad_id)
        log_step_metrics(trainer, {f"{self.prefix}/{k}": v for k, v in result.items()})
        self.history.append((trainer.global_step, result))
        return result

    def on_due_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_val_end and not trainer.sanity_checking:
            self.run_once(trainer, pl_module)
