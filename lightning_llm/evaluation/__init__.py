"""HELM-style evaluation suite: tasks, perturbations, the runner and the report.

``lightning-llm evaluate --model PATH [--config configs/eval/helm.yaml] [--out DIR]`` on the command line,
:func:`evaluate` in Python.
"""

from lightning_llm._lazy import lazy_exports
from lightning_llm.evaluation.lm import LanguageModel, resolve_model
from lightning_llm.evaluation.perturbations import PERTURBATIONS, Perturbation, get_perturbation
from lightning_llm.evaluation.report import plot_perplexity_vs_context, render_markdown, write_report
from lightning_llm.evaluation.runner import (
    BiasPart,
    EfficiencyPart,
    EmbeddingsPart,
    FairnessPart,
    HarnessPart,
    LambadaPart,
    MultipleChoicePart,
    PerplexityPart,
    RobustnessPart,
    evaluate,
)
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
    "PERTURBATIONS",
    "BiasPart",
    "EmbeddingsPart",
    "HarnessLM",
    "HarnessPart",
    "EfficiencyPart",
    "FairnessPart",
    "LambadaPart",
    "LanguageModel",
    "MultipleChoiceExample",
    "MultipleChoicePart",
    "PerplexityPart",
    "Perturbation",
    "RobustnessPart",
    "embedded_multiple_choice",
    "evaluate",
    "evaluate_lambada",
    "evaluate_multiple_choice",
    "get_perturbation",
    "load_multiple_choice",
    "perplexity_vs_context",
    "plot_perplexity_vs_context",
    "render_markdown",
    "resolve_model",
    "rolling_nll",
    "score_continuations",
    "text_perplexity",
    "write_report",
]

# HarnessLM imports lm-eval (an optional extra, slow to import): loaded on first access
__getattr__, __dir__ = lazy_exports(__name__, {"HarnessLM": "lightning_llm.evaluation.harness"})
