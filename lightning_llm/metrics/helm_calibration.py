"""``HELMCalibration`` metric: HELM's calibration suite over every instance seen (see ``functional/calibration.py``).

Notation:
    N: instances; conf: confidence in [0, 1]; correct: 0/1 per instance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from lightning_llm.metrics._base import Float64StateMetric
from lightning_llm.metrics.functional._checks import _check_confidence_correct, _check_positive_int
from lightning_llm.metrics.functional.calibration import helm_calibration


class HELMCalibration(Float64StateMetric):
    """HELM's calibration metrics over every instance seen, across processes.

    Keys: ``ece_10_bin``, ``ece_1_bin``, ``selective_cov_acc_area``, ``selective_acc@10``, ``platt_ece_10_bin``,
    ``platt_ece_1_bin``, and (unless all instances are correct or all wrong) ``platt_coef``, ``platt_intercept``.

    Equal-mass binning, selective accuracy and Platt scaling need every instance, so the states are the
    concatenated ``confidence`` and ``correct`` lists (``dist_reduce_fx="cat"``); memory is O(N), 16 bytes each.

    ``update(confidence, correct)``: one confidence in [0, 1] and one 0/1 (or bool) correctness per instance.
    ``compute()`` returns a dict of float64 scalar tensors (:func:`helm_calibration` returns plain floats).

    Example:
        >>> import torch
        >>> metric = HELMCalibration()
        >>> metric.update(torch.tensor([0.9, 0.8]), torch.tensor([1, 0]))
        >>> metric.update(torch.tensor([0.6, 0.3]), torch.tensor([1, 0]))
        >>> out = metric.compute()
        >>> round(out["ece_1_bin"].item(), 6)  # |mean(0.9, 0.8, 0.6, 0.3) - 2/4|
        0.15
    """

    is_differentiable = False
    higher_is_better = False
    confidence: list[Tensor]
    correct: list[Tensor]

    def __init__(self, num_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_positive_int("num_bins", num_bins)
        self.num_bins = num_bins
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Append one batch of instances."""
        conf, corr = _check_confidence_correct(confidence, correct)
        self.confidence.append(conf)
        self.correct.append(corr)

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Every rank must take part in the gather of a list state: a rank that saw no instance adds an empty one
        (torchmetrics gathers a list state element by element, so an empty list would skip the collective)."""
        if isinstance(self.confidence, list) and not self.confidence:
            self.confidence.append(torch.zeros(0, dtype=torch.float64, device=self.device))
            self.correct.append(torch.zeros(0, dtype=torch.float64, device=self.device))
        super().sync(*args, **kwargs)

    def _gathered(self) -> tuple[Tensor, Tensor]:
        if isinstance(self.confidence, list) and not self.confidence:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        return dim_zero_cat(self.confidence), dim_zero_cat(self.correct)

    def compute(self) -> dict[str, Tensor]:
        """HELM's metrics as float64 scalars; raises ``ValueError`` if no instance was seen."""
        conf, corr = self._gathered()
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in helm_calibration(conf, corr, self.num_bins).items()}
