"""lightning_llm: PyTorch Lightning components for building, training, aligning and evaluating language models.

The public API is listed in ``__all__``. Names are imported lazily on first access, so ``import lightning_llm`` stays
cheap and the pure-torch parts (``lightning_llm.nn``) never pull in Lightning.
"""

from __future__ import annotations

from lightning_llm._lazy import lazy_exports

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
    "GRPO": "lightning_llm.modules.grpo",
    "RLOO": "lightning_llm.modules.grpo",
    "SFT": "lightning_llm.modules.sft",
    "TextDataModule": "lightning_llm.data",
    "LambadaDataModule": "lightning_llm.data",
    "Tokenizer": "lightning_llm.data",
    "PreferenceDataModule": "lightning_llm.data",
    "PromptDataModule": "lightning_llm.data",
    "SFTDataModule": "lightning_llm.data",
    "Perplexity": "lightning_llm.metrics",
    "LambadaAccuracy": "lightning_llm.metrics",
    "HELMCalibration": "lightning_llm.metrics",
    "BitsPerByte": "lightning_llm.metrics",
    "ExpectedCalibrationError": "lightning_llm.metrics",
    "BrierScore": "lightning_llm.metrics",
    "AtomicCheckpointIO": "lightning_llm.checkpoint",
    "ResumableDataLoader": "lightning_llm.checkpoint",
    "load_checkpoint": "lightning_llm.checkpoint",
    "load_pretrained": "lightning_llm.loading",
    "LLMModule": "lightning_llm.modules.base",
    "token_logprobs": "lightning_llm.ops",
    "IGNORE_INDEX": "lightning_llm.ops",
    "ddp": "lightning_llm.parallel",
    "fsdp": "lightning_llm.parallel",
    "fsdp2": "lightning_llm.parallel",
    "PipelineStrategy": "lightning_llm.parallel",
    "FSDP2Strategy": "lightning_llm.parallel",
    "parallelize": "lightning_llm.parallel",
    "plan": "lightning_llm.parallel",
    "consolidate_checkpoint": "lightning_llm.parallel",
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
    "MetricsFile": "lightning_llm.callbacks",
    "from_hf": "lightning_llm.hf",
    "to_hf": "lightning_llm.hf",
    "save_hf": "lightning_llm.hf",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
