"""``BrierScore`` metric: mean squared error between confidence and 0/1 correctness.

Notation:
    N: instances; conf: confidence in [0, 1]; correct: 0/1 per instance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.metrics._base import Float64StateMetric
from lightning_llm.metrics.functional._checks import _check_confidence_correct


class BrierScore(Float64StateMetric):
    """Brier score ``mean((conf - correct)^2)``; states ``sum_squared_error`` (float64) and ``n`` (int64), summed.

    Example:
        >>> import torch
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([0.9, 0.4]), torch.tensor([1, 0]))
        >>> metric.compute()  # (0.1^2 + 0.4^2) / 2
        tensor(0.0850, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    sum_squared_error: Tensor
    n: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_states(sum_squared_error=torch.float64, n=torch.int64)

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add one batch of (confidence, 0/1 correct) pairs."""
        conf, corr = _check_confidence_correct(confidence, correct)
        self.sum_squared_error += ((conf - corr) ** 2).sum().to(self.sum_squared_error.device)
        self.n += conf.numel()

    def compute(self) -> Tensor:
        """Brier score (float64 scalar); raises ``ValueError`` if no instance was seen."""
        if int(self.n) == 0:
            raise ValueError(
                "Brier score of zero instances is undefined: received n = 0. Fix: call update() with at least one"
                " (confidence, correct) pair before compute()."
            )
        return self.sum_squared_error / self.n
