"""One dataclass drives the whole architecture (litgpt style).

Variants are chosen by string fields and validated in ``__post_init__``; derived fields
(``n_kv_head``, ``head_dim``, ``intermediate_size``) are filled in there so that a config
written to YAML with only the essentials round-trips to the same model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

POS_ENCODINGS = ("rope", "alibi", "learned", "sinusoidal", "none")
ROPE_LAYOUTS = ("half", "interleaved")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
BACKENDS = ("auto", "sdpa", "flex", "eager")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"TransformerConfig.{name} must be one of {options}, got {value!r}; pick one of those.")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {value!r}; set it to an int >= 1.")


@dataclass
class TransformerConfig:
    """Architecture of a decoder-only transformer.

    Args:
        vocab_size: number of token ids (the tokenizer's vocabulary; linked automatically by the CLI).
        block_size: longest sequence the model is built for (learned position table size, RoPE cache size).
        n_layer: number of transformer blocks.
        n_head: number of query heads.
        n_embd: model width.
        n_kv_head: number of key/value heads (``None`` = ``n_head``: multi-head; 1: multi-query; otherwise grouped-query).
        head_dim: per-head width (``None`` = ``n_embd // n_head``).
        intermediate_size: MLP hidden width (``None``: 4 * n_embd for GELU, ``~8/3 * n_embd`` rounded up to 64 for SwiGLU).
        pos_encoding: ``"rope" | "alibi" | "learned" | "sinusoidal" | "none"``.
        rope_base: RoPE base (theta).
        rope_layout: ``"half"`` pairs dim i with i + d/2 (Hugging Face ``rotate_half``); ``"interleaved"`` pairs (2i, 2i+1) (GPT-J, Meta).
        partial_rotary_factor: fraction of each head that is rotated (GPT-NeoX 0.25, Llama 1.0).
        rope_scaling: ``None`` or a dict with ``type`` in ``linear | dynamic | yarn | llama3`` and ``factor`` (plus
            ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``attention_factor``, ``low_freq_factor``,
            ``high_freq_factor`` where they apply), the same keys as Hugging Face's ``rope_scaling``.
        norm: ``"rmsnorm" | "layernorm"``.
        norm_eps: epsilon of the normalisation layers.
        mlp: ``"swiglu" | "gelu"``.
        gelu_approximate: ``"none"`` (exact erf GELU, GPT-NeoX) or ``"tanh"`` (GPT-2, BLOOM).
        bias: biases in the attention and MLP projections.
        lm_head_bias: a bias on the output projection.
        tie_embeddings: share the input embedding with the output projection.
        parallel_residual: GPT-NeoX style ``x + attn(ln1(x)) + mlp(ln2(x))``.
        shared_attention_norm: with ``parallel_residual``, use ``ln1`` for the MLP too (GPT-J / Falcon style).
        embedding_norm: a normalisation right after the token embedding (BLOOM).
        dropout: dropout on embeddings, attention probabilities and residual branches.
        attention_backend: ``"auto"`` picks SDPA (flash when no bias), FlexAttention for ALiBi on CUDA, the SDPA float-bias
            path elsewhere; ``"sdpa" | "flex" | "eager"`` force one (``eager`` is the plain reference used in tests).
        init_std: standard deviation of the normal initialisation; residual output projections are scaled by
            ``1/sqrt(2 * n_layer)`` (GPT-2 / nanoGPT), which keeps the residual stream's variance stable with depth.
        padded_vocab_size: ``None`` = ``vocab_size``; a larger embedding table (e.g. a multiple of 64 for speed).
    """

    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    pos_encoding: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = "rope"
    rope_base: float = 10000.0
    rope_layout: Literal["half", "interleaved"] = "half"
    partial_rotary_factor: float = 1.0
    rope_scaling: dict[str, Any] | None = None
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    gelu_approximate: Literal["none", "tanh"] = "none"
    bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    parallel_residual: bool = False
    shared_attention_norm: bool = False
    embedding_norm: bool = False
    dropout: float = 0.0
    attention_backend: Literal["auto", "sdpa", "flex", "eager"] = "auto"
    init_std: float = 0.02
    padded_vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        _choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        _choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        _choice("gelu_approximate", self.gelu_approximate, ("none", "tanh"))
        _choice("attention_backend", self.attention_backend, BACKENDS)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"TransformerConfig.n_head ({self.n_head}) must divide n_embd ({self.n_embd}) when head_dim is not "
                    f"given; choose n_head among the divisors of {self.n_embd} or set head_dim explicitly."
                )
            self.head_dim = self.n_embd // self.n_head
        _positive_int("head_dim", self.head_dim)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _positive_int("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"TransformerConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); use a divisor of "
                f"{self.n_head} (1 = multi-query, {self.n_head} = multi-head)."
            )
        if self.intermediate_size is None:
            if self.mlp == "gelu":
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = 64 * math.ceil(int(8 * self.n_embd / 3) / 64)
        _positive_int("intermediate_size", self.intermediate_size)
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(
                f"TransformerConfig.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}; use 1.0 "
                "to rotate the whole head (Llama) or e.g. 0.25 (GPT-NeoX)."
            )
        if self.pos_encoding == "rope" and self.rope_dim % 2:
            raise ValueError(
                f"The rotary dimension head_dim * partial_rotary_factor = {self.head_dim} * {self.partial_rotary_factor} "
                f"= {self.rope_dim} must be even; change head_dim or partial_rotary_factor."
            )
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(
                f"TransformerConfig.n_embd must be even for sinusoidal positions, got {self.n_embd}; use an even width "
                "or another pos_encoding."
            )
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            else:
                _choice("rope_scaling['type']", kind, ROPE_SCALINGS)
                self.rope_scaling["type"] = kind
                self.rope_scaling.pop("rope_type", None)
                factor = self.rope_scaling.get("factor")
                if not isinstance(factor, (int, float)) or factor < 1.0:
                    raise ValueError(
                        f"TransformerConfig.rope_scaling['factor'] must be a number >= 1, got {factor!r}; "
                        "e.g. rope_scaling={'type': 'linear', 'factor': 2.0}."
                    )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}; e.g. 0.0 or 0.1.")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"TransformerConfig.padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size "
                f"({self.vocab_size}); leave it unset (= vocab_size) or round vocab_size up, e.g. to a multiple of 64."
            )

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head (``head_dim * partial_rotary_factor``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def n_query_groups(self) -> int:
        return self.n_kv_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown TransformerConfig key(s) {unknown}; valid keys are {sorted(known)}. Check the spelling in your config."
            )
        return cls(**data)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count computed from the config (``non_embedding`` drops token and position tables)."""
        c = self
        attn = c.n_embd * c.head_dim * (c.n_head + 2 * c.n_kv_head) + c.n_head * c.head_dim * c.n_embd
        if c.bias:
            attn += c.head_dim * (c.n_head + 2 * c.n_kv_head) + c.n_embd
        n_in = 2 if c.mlp == "swiglu" else 1
        mlp = (n_in + 1) * c.n_embd * c.intermediate_size
        if c.bias:
            mlp += n_in * c.intermediate_size + c.n_embd
        norm = c.n_embd * (2 if c.norm == "layernorm" else 1)
        n_norms = 1 if (c.parallel_residual and c.shared_attention_norm) else 2
        block = attn + mlp + n_norms * norm
        total = c.n_layer * block + norm  # final norm
        head = 0 if c.tie_embeddings else c.padded_vocab_size * c.n_embd
        total += head + (c.padded_vocab_size if c.lm_head_bias else 0)
        if c.embedding_norm:
            total += norm
        if not non_embedding:
            total += c.padded_vocab_size * c.n_embd
            if c.pos_encoding == "learned":
                total += c.block_size * c.n_embd
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, ``6 N + 12 L H Q T`` (PaLM appendix B; N = non-embedding parameters)."""
        t = seq_len or self.block_size
        n = self.num_parameters(non_embedding=True)
        if self.tie_embeddings:  # the tied output projection still costs a V x C matmul per token
            n += self.padded_vocab_size * self.n_embd
        return 6 * n + 12 * self.n_layer * self.n_head * self.head_dim * t
