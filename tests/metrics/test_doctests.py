"""The docstring examples of every metrics module are real doctests."""

import doctest
import importlib

import pytest

MODULES = [
    "lightning_llm.metrics.functional.language_modeling",
    "lightning_llm.metrics.functional.lambada",
    "lightning_llm.metrics.functional.calibration",
    "lightning_llm.metrics.functional.confidence",
    "lightning_llm.metrics.perplexity",
    "lightning_llm.metrics.bits_per_byte",
    "lightning_llm.metrics.lambada",
    "lightning_llm.metrics.helm_calibration",
    "lightning_llm.metrics.calibration_error",
    "lightning_llm.metrics.brier_score",
    "lightning_llm.metrics.plot",
]


@pytest.mark.parametrize("module", MODULES)
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no doctest examples"
    assert result.failed == 0
