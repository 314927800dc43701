"""LightningModules: thin glue over ``lightning_llm.nn`` and ``lightning_llm.rlhf``."""

from lightning_llm.modules.causal_lm import CausalLM

__all__ = ["CausalLM"]
