"""HELM-style evaluation suite: tasks, perturbations, the runner and the report.

``python -m lightning_llm.evaluation --checkpoint PATH | --hf PATH [--config configs/eval/helm.yaml] --out DIR``.
"""

from lightning_llm.evaluation.lm import LanguageModel, load_model
from lightning_llm.evaluation.perturbations import PERTURBATIONS, Perturbation, get_perturbation
from lightning_llm.evaluation.report import plot_perplexity_vs_context, render_markdown, write_report
from lightning_llm.evaluation.runner import DEFAULT_CONFIG, evaluate, load_config
from lightning_llm.evaluation.tasks import (
    MultipleChoiceExample,
    embedded_multiple_choice,
    evaluate_lambada,
    evaluate_multiple_choice,
    load_multiple_choice,
    perplexity_vs_context,
    rolling_nll,
    score_continuations,
    text_perplexity,
)

__all__ = [
    "DEFAULT_CONFIG",
    "PERTURBATIONS",
    "LanguageModel",
    "MultipleChoiceExample",
    "Perturbation",
    "embedded_multiple_choice",
    "evaluate",
    "evaluate_lambada",
    "evaluate_multiple_choice",
    "get_perturbation",
    "load_config",
    "load_model",
    "load_multiple_choice",
    "perplexity_vs_context",
    "plot_perplexity_vs_context",
    "render_markdown",
    "rolling_nll",
    "score_continuations",
    "text_perplexity",
    "write_report",
]
