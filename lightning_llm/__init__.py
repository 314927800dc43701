"""lightning_llm: PyTorch Lightning components for building, training, aligning and evaluating language models.

The public API is listed in ``__all__``. Names are imported lazily on first access, so ``import lightning_llm`` stays
cheap and the pure-torch parts (``lightning_llm.nn``) never pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TransformerConfig": "lightning_llm.config",
    "Transformer": "lightning_llm.nn",
    "KVCache": "lightning_llm.nn",
    "generate": "lightning_llm.nn",
    "CausalLM": "lightning_llm.modules.causal_lm",
    "RewardModel": "lightning_llm.modules.reward_model",
    "PPO": "lightning_llm.modules.ppo",
    "DPO": "lightning_llm.modules.dpo",
    "TextDataModule": "lightning_llm.data",
    "LambadaDataModule": "lightning_llm.data",
    "Tokenizer": "lightning_llm.data",
    "PreferenceDataModule": "lightning_llm.data",
    "PromptDataModule": "lightning_llm.data",
    "Perplexity": "lightning_llm.metrics",
    "LambadaAccuracy": "lightning_llm.metrics",
    "HELMCalibration": "lightning_llm.metrics",
    "BitsPerByte": "lightning_llm.metrics",
    "ExpectedCalibrationError": "lightning_llm.metrics",
    "BrierScore": "lightning_llm.metrics",
    "AtomicCheckpointIO": "lightning_llm.checkpoint",
    "ResumableDataLoader": "lightning_llm.checkpoint",
    "ddp": "lightning_llm.strategies",
    "fsdp": "lightning_llm.strategies",
    "fsdp2": "lightning_llm.strategies",
    "parallelize": "lightning_llm.strategies",
    "plan": "lightning_llm.strategies",
    "consolidate_checkpoint": "lightning_llm.consolidate",
    "LightningLLMCLI": "lightning_llm.cli",
    "evaluate": "lightning_llm.evaluation",
    "EvalSubsetMonitor": "lightning_llm.callbacks",
    "PerplexityMonitor": "lightning_llm.callbacks",
    "LambadaMonitor": "lightning_llm.callbacks",
    "CalibrationMonitor": "lightning_llm.callbacks",
    "LLMThroughputMonitor": "lightning_llm.callbacks",
    "EmbeddingProbe": "lightning_llm.callbacks",
    "LossSpikeGuard": "lightning_llm.callbacks",
    "GenerationSamples": "lightning_llm.callbacks",
    "LearningCurves": "lightning_llm.callbacks",
    "from_hf": "lightning_llm.hf",
    "to_hf": "lightning_llm.hf",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_llm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
