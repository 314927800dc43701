"""``ExpectedCalibrationError`` metric: equal-width bins with fixed-size per-bin sum states.

Notation:
    k: number of bins; conf: confidence in [0, 1]; correct: 0/1 per instance.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_llm.metrics._base import Float64StateMetric
from lightning_llm.metrics.functional._checks import _check_positive_int
from lightning_llm.metrics.functional.calibration import _check_norm, _ece_compute, _ece_update


class ExpectedCalibrationError(Float64StateMetric):
    """Equal-width calibration error: ``l1`` (ECE), ``l2`` (RMS) or ``max`` (MCE), cheap enough for training.

    States are three ``(num_bins,)`` tensors, summed across processes: ``bin_count`` (int64), ``bin_conf_sum`` and
    ``bin_correct_sum`` (float64). Bins are ``[i/k, (i+1)/k)``, the last closed at 1.0; the result equals
    torchmetrics' ``BinaryCalibrationError(n_bins=k, norm=...)`` on ``(confidence, correct)`` for confidences
    below 1.0 (torchmetrics gives exactly 1.0 an extra bin of its own).

    Example:
        >>> import torch
        >>> metric = ExpectedCalibrationError(num_bins=2)
        >>> metric.update(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]))
        >>> metric.compute()  # |0.2 - 0| / 2 + |0.8 - 1| / 2
        tensor(0.2000, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    bin_count: Tensor
    bin_conf_sum: Tensor
    bin_correct_sum: Tensor

    def __init__(self, num_bins: int = 15, norm: Literal["l1", "l2", "max"] = "l1", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_positive_int("num_bins", num_bins)
        _check_norm(norm)
        self.num_bins = num_bins
        self.norm = norm
        self.add_state("bin_count", default=torch.zeros(num_bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("bin_conf_sum", default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_correct_sum", default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add one batch of (confidence, 0/1 correct) pairs to the bins."""
        count, conf_sum, corr_sum = _ece_update(confidence, correct, self.num_bins)
        self.bin_count += count.to(self.bin_count.device)
        self.bin_conf_sum += conf_sum.to(self.bin_conf_sum.device)
        self.bin_correct_sum += corr_sum.to(self.bin_correct_sum.device)

    def compute(self) -> Tensor:
        """Calibration error (float64 scalar); raises ``ValueError`` if no instance was seen."""
        return _ece_compute(self.bin_count, self.bin_conf_sum, self.bin_correct_sum, self.norm)
