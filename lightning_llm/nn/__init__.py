"""Pure-torch building blocks (never imports lightning)."""

from lightning_llm.nn.alibi import alibi_bias, alibi_slopes
from lightning_llm.nn.attention import CausalSelfAttention
from lightning_llm.nn.generation import GenerationOutput, check_sampling, filter_logits, generate, left_pad, sample_next
from lightning_llm.nn.heads import ScalarHead, chunked_cross_entropy
from lightning_llm.nn.kv_cache import KVCache
from lightning_llm.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq
from lightning_llm.nn.transformer import MLP, Block, RMSNorm, Transformer, sinusoidal_embedding

__all__ = [
    "Block",
    "CausalSelfAttention",
    "GenerationOutput",
    "KVCache",
    "MLP",
    "RMSNorm",
    "ScalarHead",
    "Transformer",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "check_sampling",
    "chunked_cross_entropy",
    "filter_logits",
    "generate",
    "left_pad",
    "rope_cos_sin",
    "sample_next",
    "rope_inv_freq",
    "sinusoidal_embedding",
]
