"""Evaluation metrics as torchmetrics ``Metric`` classes; plain-torch functions live in ``metrics.functional``."""

from lightning_llm.metrics.bits_per_byte import BitsPerByte
from lightning_llm.metrics.brier_score import BrierScore
from lightning_llm.metrics.calibration_error import ExpectedCalibrationError
from lightning_llm.metrics.helm_calibration import HELMCalibration
from lightning_llm.metrics.lambada import LambadaAccuracy
from lightning_llm.metrics.perplexity import Perplexity
from lightning_llm.metrics.plot import plot_reliability_diagram

__all__ = [
    "BitsPerByte",
    "BrierScore",
    "ExpectedCalibrationError",
    "HELMCalibration",
    "LambadaAccuracy",
    "Perplexity",
    "plot_reliability_diagram",
]
