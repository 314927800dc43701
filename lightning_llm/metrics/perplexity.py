"""``Perplexity`` metric: exact, chunked, distributed-correct (see ``functional/language_modeling.py``).

Notation:
    B: batch size, T: sequence length, V: vocabulary size; NLL in nats.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_llm.metrics._base import Float64StateMetric
from lightning_llm.metrics.functional._checks import _check_ignore_index
from lightning_llm.metrics.functional.language_modeling import (
    _perplexity_compute,
    _perplexity_from_logprobs_update,
    _perplexity_update,
)


def _nll_and_count(
    logits: Tensor | None,
    target: Tensor | None,
    logprobs: Tensor | None,
    mask: Tensor | None,
    ignore_index: int | None,
    chunk_bytes: int | None,
    validate_args: bool,
) -> tuple[Tensor, Tensor]:
    """Dispatch between the ``(logits, target)`` and the ``logprobs=`` / ``mask=`` inputs."""
    if logprobs is not None:
        if logits is not None or target is not None:
            raise ValueError(
                "Pass either `logits` and `target`, or `logprobs=` (with optional `mask=`), not both."
                " Fix: update(logits, target) when you have logits; update(logprobs=lp, mask=m) when scored elsewhere."
            )
        return _perplexity_from_logprobs_update(logprobs, mask, validate_args)
    if logits is None or target is None:
        raise ValueError(
            "update() needs `logits` (B, T, V) and `target` (B, T), or `logprobs=` (B, T) with optional `mask=`;"
            f" received logits={'None' if logits is None else 'Tensor'}, target={'None' if target is None else 'Tensor'}."
        )
    if mask is not None:
        raise ValueError("`mask=` only goes with `logprobs=`. Fix: with logits, mark padding via ignore_index.")
    return _perplexity_update(logits, target, ignore_index, chunk_bytes, validate_args)


class _TokenNLLMetric(Float64StateMetric):
    """Shared state of :class:`Perplexity` and ``BitsPerByte``: ``nll_sum`` (float64) and ``count`` (int64, tokens).

    A subclass lists further scalar states (name: dtype) in ``_extra_states``; they are registered between the two.
    All states are summed across processes.
    """

    _extra_states: ClassVar[dict[str, torch.dtype]] = {}
    nll_sum: Tensor
    count: Tensor

    def __init__(
        self,
        ignore_index: int | None = None,
        chunk_bytes: int | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_ignore_index(ignore_index)
        self.ignore_index = ignore_index
        self.chunk_bytes = chunk_bytes
        self.validate_args = validate_args
        self._add_sum_states(nll_sum=torch.float64, **self._extra_states, count=torch.int64)

    def update(
        self,
        logits: Tensor | None = None,
        target: Tensor | None = None,
        *,
        logprobs: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add the NLL sum and scored-token count of a batch given as ``(logits, target)`` or ``logprobs=``/``mask=``."""
        nll_sum, count = _nll_and_count(
            logits, target, logprobs, mask, self.ignore_index, self.chunk_bytes, self.validate_args
        )
        self.nll_sum += nll_sum.to(self.nll_sum.device)
        self.count += count.to(self.count.device)


class Perplexity(_TokenNLLMetric):
    """Perplexity ``exp(total NLL / scored tokens)`` over all updates (and processes).

    Inputs to ``update`` / ``forward``, one of:

    - ``logits`` ``(B, T, V)`` any float dtype and ``target`` ``(B, T)`` int64 (aligned: ``target[b, t]`` is
      predicted from position ``t``); log-softmax in float32 (float64 kept), chunked over rows;
    - ``logprobs=`` per-token log-probabilities (any shape) and optional ``mask=`` (bool, same shape, ``True`` =
      scored) for models that score elsewhere.

    States: ``nll_sum`` (float64) and ``count`` (int64), both summed across processes.

    Args:
        ignore_index: target value not scored (e.g. ``-100``); ``None`` scores every position.
        chunk_bytes: byte budget of one float32 chunk of logits; ``None``: 8 MiB on CPU, 256 MiB elsewhere.
        validate_args: check target range and finiteness (one host sync per update).
        kwargs: torchmetrics ``Metric`` keyword arguments.

    Example:
        >>> import torch
        >>> metric = Perplexity(ignore_index=-100)
        >>> metric.update(torch.zeros(2, 3, 8), torch.tensor([[1, 2, 3], [4, -100, -100]]))  # uniform: ppl = V
        >>> metric.compute()
        tensor(8.0000, dtype=torch.float64)
        >>> metric.update(logprobs=torch.tensor([[0.0]]))  # one more token with probability 1
        >>> round(metric.compute().item(), 4)  # exp(4 ln 8 / 5)
        5.278
    """

    is_differentiable = True
    higher_is_better = False

    def compute(self) -> Tensor:
        """Perplexity (float64 scalar); raises ``ValueError`` if no token was scored."""
        return _perplexity_compute(self.nll_sum, self.count)
