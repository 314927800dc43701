"""Functional (plain torch) metrics: perplexity, bits per byte, LAMBADA, calibration, confidence helpers."""

from lightning_llm.metrics.functional.calibration import (
    brier_score,
    equal_mass_bin_edges,
    equal_mass_ece,
    expected_calibration_error,
    helm_calibration,
    platt_scale,
    platt_scaling_fit,
    selective_stats,
)
from lightning_llm.metrics.functional.confidence import generation_confidence, multiple_choice_confidence
from lightning_llm.metrics.functional.lambada import lambada_accuracy, lambada_compute, lambada_update
from lightning_llm.metrics.functional.language_modeling import (
    bits_per_byte,
    perplexity,
    perplexity_from_logprobs,
    token_nll,
)

__all__ = [
    "bits_per_byte",
    "brier_score",
    "equal_mass_bin_edges",
    "equal_mass_ece",
    "expected_calibration_error",
    "generation_confidence",
    "helm_calibration",
    "lambada_accuracy",
    "lambada_compute",
    "lambada_update",
    "multiple_choice_confidence",
    "perplexity",
    "perplexity_from_logprobs",
    "platt_scale",
    "platt_scaling_fit",
    "selective_stats",
    "token_nll",
]
