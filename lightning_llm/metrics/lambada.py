"""``LambadaAccuracy`` metric: LAMBADA accuracy and perplexity, lm-evaluation-harness definitions.

Notation:
    B: examples (rows), T: sequence length, V: vocabulary size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.metrics._base import Float64StateMetric
from lightning_llm.metrics.functional._checks import _check_ignore_index
from lightning_llm.metrics.functional.lambada import lambada_compute, lambada_update
from lightning_llm.ops import IGNORE_INDEX


class LambadaAccuracy(Float64StateMetric):
    """LAMBADA ``{"acc", "ppl"}``: every row of a batch is one example.

    ``update(logits (B, T, V), target (B, T))``: ``target`` holds the target (last-word) token ids at the
    positions that predict them and ``ignore_index`` everywhere else. An example is correct iff the greedy argmax
    matches at every target position; ``ppl = exp(-logprob_sum / n)`` with ``logprob_sum`` the sum over examples
    of each example's summed target log-probability (per example, not per token).

    States: ``correct`` (int64), ``logprob_sum`` (float64), ``n`` (int64), all summed across processes.
    ``compute()`` returns a dict of float64 scalars; log it with ``self.log_dict(metric.compute())`` (or
    ``self.log_dict`` of its items at epoch end), since ``self.log`` takes single-valued metrics only.

    Example:
        >>> import torch
        >>> metric = LambadaAccuracy()
        >>> logits = torch.zeros(2, 2, 4)
        >>> logits[0, 1, 3] = 100.0  # example 0 predicts its target 3 with probability ~1
        >>> metric.update(logits, torch.tensor([[-100, 3], [-100, 2]]))  # example 1: uniform, argmax 0 != 2
        >>> out = metric.compute()
        >>> out["acc"].item(), round(out["ppl"].item(), 4)  # exp(-(0 + log 1/4) / 2) = 2
        (0.5, 2.0)
    """

    is_differentiable = False
    higher_is_better = True  # for "acc"; lower "ppl" is better
    correct: Tensor
    logprob_sum: Tensor
    n: Tensor

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        chunk_bytes: int | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_ignore_index(ignore_index)
        if ignore_index is None:
            raise ValueError("`ignore_index` must be an int marking non-target positions, received None. Fix: -100.")
        self.ignore_index = ignore_index
        self.chunk_bytes = chunk_bytes
        self.validate_args = validate_args
        self._add_sum_states(correct=torch.int64, logprob_sum=torch.float64, n=torch.int64)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Score a batch of examples (one per row)."""
        correct, logprob = lambada_update(logits, target, self.ignore_index, self.chunk_bytes, self.validate_args)
        self.correct += correct.sum().to(self.correct.device)
        self.logprob_sum += logprob.sum().to(self.logprob_sum.device)
        self.n += correct.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"acc": ..., "ppl": ...}`` (float64); raises ``ValueError`` if no example was seen."""
        return lambada_compute(self.correct, self.logprob_sum, self.n)
