"""``BitsPerByte`` metric: NLL (nats) / (ln 2 * UTF-8 bytes), comparable across tokenizers.

Notation:
    B: batch size, T: sequence length, V: vocabulary size; NLL in nats.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_llm.metrics.functional.language_modeling import _bits_per_byte_compute, _check_num_bytes
from lightning_llm.metrics.perplexity import _TokenNLLMetric


class BitsPerByte(_TokenNLLMetric):
    """Bits per UTF-8 byte ``total NLL / (ln 2 * total bytes)`` over all updates (and processes).

    ``update(logits, target, num_bytes)`` or ``update(logprobs=..., mask=..., num_bytes=...)``, where
    ``num_bytes`` (int, scalar or ``(B,)`` integer tensor) is the number of UTF-8 bytes the *scored* tokens cover,
    e.g. ``len(tokenizer.decode(scored_ids).encode("utf-8"))``.

    States: ``nll_sum`` (float64), ``num_bytes`` and ``count`` (int64, scored tokens), all summed across processes.

    Example:
        >>> import math, torch
        >>> metric = BitsPerByte()
        >>> metric.update(torch.zeros(1, 4, 256), torch.tensor([[1, 2, 3, 4]]), num_bytes=4)  # 8 bits per token
        >>> round(metric.compute().item(), 5)
        8.0
    """

    is_differentiable = True
    higher_is_better = False
    _extra_states: ClassVar[dict[str, torch.dtype]] = {"num_bytes": torch.int64}
    num_bytes: Tensor

    def update(
        self,
        logits: Tensor | None = None,
        target: Tensor | None = None,
        num_bytes: Tensor | int | None = None,
        *,
        logprobs: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add the NLL, scored-token count and byte count of a batch."""
        if num_bytes is None:
            raise ValueError(
                "BitsPerByte.update needs `num_bytes`, the number of UTF-8 bytes covered by the scored tokens,"
                " received None. Fix: update(logits, target, num_bytes=len(text.encode('utf-8')))."
            )
        batch = logits.shape[0] if logits is not None else (logprobs.shape[0] if logprobs is not None else None)
        n_bytes = _check_num_bytes(num_bytes, batch)
        super().update(logits, target, logprobs=logprobs, mask=mask)
        self.num_bytes += n_bytes.to(self.num_bytes.device)

    def compute(self) -> Tensor:
        """Bits per byte (float64 scalar); raises ``ValueError`` if no bytes were counted."""
        return _bits_per_byte_compute(self.nll_sum, self.num_bytes)
