"""Hugging Face <-> lightning_llm weight conversion (``transformers`` is an optional dependency).

Notation: C width, H query heads, G key/value heads, D head dim, R rotated dims per head, F MLP hidden width,
V vocabulary, L layers.

* :func:`from_hf` turns a ``LlamaForCausalLM``, ``GPTNeoXForCausalLM``, ``BloomForCausalLM`` or ``GPT2LMHeadModel``
  (an instance, or a local directory loaded with ``AutoModelForCausalLM.from_pretrained``) into a
  :class:`~lightning_llm.nn.transformer.Transformer` with the same weights and, in float32, the same logits.
* :func:`config_from_hf` is the config half of that: a ``transformers`` config -> :class:`TransformerConfig`.
* :func:`to_hf` / :func:`save_hf` go the other way for every configuration one of these four can represent
  (:func:`hf_architecture` picks it), so a model trained here can be served by the Hugging Face ecosystem.

How each architecture maps onto our module names (``blocks[i].attn.q_proj`` etc.):

* Llama: one to one; RoPE ``rotate_half`` layout, grouped-query heads, ``rope_scaling`` (linear, dynamic, yarn, llama3).
* GPT-NeoX: ``query_key_value`` is fused PER HEAD, rows ordered ``(H, 3, D)`` = ``[q_0; k_0; v_0; q_1; ...]``;
  partial rotary (``rotary_pct`` in transformers 4.x, ``rope_parameters['partial_rotary_factor']`` in 5.x);
  ``use_parallel_residual``; LayerNorm; exact GELU.
* BLOOM: ALiBi; ``word_embeddings_layernorm`` -> ``emb_norm``; fused per-head ``(H, 3, D)`` qkv; tanh GELU; tied head.
* GPT-2: learned positions; ``Conv1D`` stores ``(in, out)`` weights, so they are transposed; ``c_attn`` is
  ``[q; k; v]`` along the output axis; ``gelu_new`` = tanh GELU; tied head. Its optional attention-scale variants
  (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx``) are folded exactly into the query projection.

Our attention always scales by ``1/sqrt(D)``, like all four. A missing bias in Hugging Face (``attention_bias=False``
next to MLP biases, say) becomes a zero bias here, which is exact.

Transformers 4.x keeps RoPE settings in ``rope_theta`` + ``rope_scaling`` (``type`` or ``rope_type``); 5.x keeps them in
``rope_parameters`` (``rope_scaling`` is an alias there). Both spellings are read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.transformer import Transformer

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "from_hf", "hf_architecture", "save_hf", "to_hf"]

#: Hugging Face class name -> ``config.model_type``.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "GPTNeoXForCausalLM": "gpt_neox",
    "BloomForCausalLM": "bloom",
    "GPT2LMHeadModel": "gpt2",
}

_INSTALL_HINT = "pip install lightning-llm[hf]"

# Hugging Face activation names -> our ``gelu_approximate``
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}

# keys of a rope scaling dict that TransformerConfig / lightning_llm.nn.rope understand
_ROPE_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
)


def _require_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"lightning_llm.hf needs the Hugging Face `transformers` package, which is not installed: {_INSTALL_HINT}"
        ) from err
    return transformers


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


# ======================================================================================================== config
def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first attribute of ``cfg`` among ``names`` that exists and is not None."""
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _rope_settings(cfg: Any, max_position: int) -> tuple[float, float | None, dict[str, Any] | None]:
    """RoPE ``(base, partial_rotary_factor or None, scaling dict or None)`` from a 4.x or 5.x config."""
    params = getattr(cfg, "rope_parameters", None)
    if not isinstance(params, dict) or not params:  # transformers 4.x: rope_theta + rope_scaling
        params = getattr(cfg, "rope_scaling", None)
    params = dict(params or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"{type(cfg).__name__} has per-layer-type rope_parameters {sorted(params)}; lightning_llm supports a single "
            "RoPE configuration shared by all layers."
        )
    base = float(params.get("rope_theta") or _get(cfg, "rope_theta", "rotary_emb_base", default=10000.0))
    partial = params.get("partial_rotary_factor") or _get(cfg, "partial_rotary_factor", "rotary_pct")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return base, partial, None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ValueError(
            f"{type(cfg).__name__} uses rope scaling type {kind!r}, which lightning_llm does not implement; supported: "
            "'default', 'linear', 'dynamic', 'yarn', 'llama3'."
        )
    scaling = {k: params[k] for k in _ROPE_KEYS if params.get(k) is not None}
    original = _get(cfg, "original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if kind == "dynamic":
        # Hugging Face's dynamic NTK measures growth against max_position_embeddings, whatever else the dict holds
        scaling["original_max_position_embeddings"] = max_position
    elif kind in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = original or max_position
    if kind == "yarn" and "factor" not in scaling:  # as HF: the ratio of the new to the pretraining context
        scaling["factor"] = max_position / scaling["original_max_position_embeddings"]
    if kind == "llama3":
        scaling.setdefault("low_freq_factor", 1.0)
        scaling.setdefault("high_freq_factor", 4.0)
    scaling["type"] = kind
    return base, partial, scaling


def _gelu_approximate(cfg: Any, act: str) -> str:
    if act not in _GELU:
        raise ValueError(
            f"{type(cfg).__name__} uses activation {act!r}; lightning_llm converts GELU MLPs with one of "
            f"{sorted(_GELU)} (exact or tanh GELU)."
        )
    return _GELU[act]


#: TransformerConfig field <-> the name Llama and GPT-NeoX configs give it (read by from_hf, written by to_hf)
_ROPE_MODEL_FIELDS = {
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_embd": "hidden_size",
    "intermediate_size": "intermediate_size",
    "tie_embeddings": "tie_word_embeddings",
}


def _rope_model(cfg: Any) -> dict[str, Any]:
    """The fields Llama and GPT-NeoX configs share: sizes, rotary settings (HF's "rotate_half" layout), tying."""
    max_pos = cfg.max_position_embeddings
    base, partial, scaling = _rope_settings(cfg, max_pos)
    fields = {ours: getattr(cfg, theirs) for ours, theirs in _ROPE_MODEL_FIELDS.items()}
    fields["tie_embeddings"] = bool(fields["tie_embeddings"])
    return dict(
        fields,
        block_size=max_pos,
        pos_encoding="rope",
        rope_base=base,
        rope_layout="half",
        partial_rotary_factor=partial,
        rope_scaling=scaling,
    )


def _llama_config(cfg: Any) -> dict[str, Any]:
    if cfg.hidden_act != "silu":
        raise ValueError(f"LlamaConfig.hidden_act must be 'silu' (SwiGLU) to convert, got {cfg.hidden_act!r}.")
    return dict(
        _rope_model(cfg),
        n_kv_head=_get(cfg, "num_key_value_heads", default=cfg.num_attention_heads),
        head_dim=_get(cfg, "head_dim", default=cfg.hidden_size // cfg.num_attention_heads),
        partial_rotary_factor=1.0,  # HF Llama rotates the whole head
        norm="rmsnorm",
        norm_eps=cfg.rms_norm_eps,
        mlp="swiglu",
        bias=bool(getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)),
    )


def _neox_config(cfg: Any) -> dict[str, Any]:
    fields = _rope_model(cfg)
    partial = fields["partial_rotary_factor"]
    return dict(
        fields,
        partial_rotary_factor=float(partial if partial is not None else 0.25),
        norm="layernorm",
        norm_eps=cfg.layer_norm_eps,
        mlp="gelu",
        gelu_approximate=_gelu_approximate(cfg, cfg.hidden_act),
        bias=True,  # the MLP always has biases; attention_bias=False becomes zero attention biases
        parallel_residual=bool(cfg.use_parallel_residual),
    )


def _bloom_config(cfg: Any) -> dict[str, Any]:
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        raise ValueError(
            "BloomConfig.apply_residual_connection_post_layernorm=True (residual taken after the norm) has no "
            "lightning_llm equivalent; only the standard pre-norm BLOOM (False) converts."
        )
    return dict(
        vocab_size=cfg.vocab_size,
        block_size=int(_get(cfg, "seq_length", "max_position_embeddings", default=2048)),
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        pos_encoding="alibi",
        norm="layernorm",
        norm_eps=cfg.layer_norm_epsilon,
        mlp="gelu",
        gelu_approximate="tanh",
        bias=True,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        embedding_norm=True,
    )


def _gpt2_config(cfg: Any) -> dict[str, Any]:
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError("GPT2Config.add_cross_attention=True (an encoder-decoder GPT-2) cannot be converted.")
    return dict(
        vocab_size=cfg.vocab_size,
        block_size=cfg.n_positions,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
        pos_encoding="learned",
        norm="layernorm",
        norm_eps=cfg.layer_norm_epsilon,
        mlp="gelu",
        gelu_approximate=_gelu_approximate(cfg, cfg.activation_function),
        bias=True,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


_CONFIG_BUILDERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "llama": _llama_config,
    "gpt_neox": _neox_config,
    "bloom": _bloom_config,
    "gpt2": _gpt2_config,
}


def config_from_hf(hf_config: Any, **overrides: Any) -> TransformerConfig:
    """Translate a ``transformers`` config (Llama, GPT-NeoX, BLOOM, GPT-2) into a :class:`TransformerConfig`.

    Dropout is set to 0 (conversion is for inference and fine-tuning; pass ``dropout=...`` to change it).

    Args:
        hf_config: a ``transformers.PretrainedConfig`` (``model.config``).
        **overrides: TransformerConfig fields to set on top, e.g. ``attention_backend="eager"``, ``dropout=0.1``.

    Raises:
        ValueError: for an unsupported ``model_type`` or an architectural option with no lightning_llm equivalent.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _CONFIG_BUILDERS:
        raise ValueError(
            f"config_from_hf: unsupported Hugging Face config {type(hf_config).__name__} (model_type={model_type!r}); "
            f"supported model types: {sorted(_CONFIG_BUILDERS)} (classes {_supported_list()})."
        )
    kwargs = _CONFIG_BUILDERS[model_type](hf_config)
    kwargs["dropout"] = 0.0
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# ======================================================================================================== weights
def _split_fused_per_head(w: torch.Tensor, n_head: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Split a per-head fused ``(H*3*D, ...)`` weight or bias into q, k, v of ``(H*D, ...)`` each."""
    rest = w.shape[1:]
    w = w.reshape(n_head, 3, head_dim, *rest)  # (H, 3, D, ...)
    return tuple(w[:, i].reshape(n_head * head_dim, *rest) for i in range(3))  # 3 x (H*D, ...)


def _bias_or_zeros(linear: nn.Module, out_features: int, like: torch.Tensor) -> torch.Tensor:
    b = getattr(linear, "bias", None)
    return b if b is not None else torch.zeros(out_features, dtype=like.dtype, device=like.device)


def _linear(state: dict, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    state[f"{name}.weight"] = weight
    if bias is not None:
        state[f"{name}.bias"] = bias


def _norm(state: dict, name: str, module: nn.Module) -> None:
    state[f"{name}.weight"] = module.weight
    if getattr(module, "bias", None) is not None:
        state[f"{name}.bias"] = module.bias


def _head(state: dict, hf_model: nn.Module, config: TransformerConfig) -> None:
    if not config.tie_embeddings:
        state["lm_head.weight"] = hf_model.get_output_embeddings().weight


_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def _llama_state(hf: nn.Module, config: TransformerConfig) -> dict[str, torch.Tensor]:
    base, state = hf.model, {}
    state["wte.weight"] = base.embed_tokens.weight
    for i, layer in enumerate(base.layers):
        p, attn, mlp = f"blocks.{i}", layer.self_attn, layer.mlp
        _norm(state, f"{p}.norm_1", layer.input_layernorm)
        _norm(state, f"{p}.norm_2", layer.post_attention_layernorm)
        for part, module, names in (("attn", attn, _LLAMA_ATTN), ("mlp", mlp, _LLAMA_MLP)):
            for name in names:
                lin = getattr(module, name)
                bias = _bias_or_zeros(lin, lin.weight.shape[0], lin.weight) if config.bias else None
                _linear(state, f"{p}.{part}.{name}", lin.weight, bias)
    _norm(state, "norm_f", base.norm)
    _head(state, hf, config)
    return state


def _fused_attention(state: dict, p: str, qkv: nn.Module, dense: nn.Module, config: TransformerConfig) -> None:
    h, d = config.n_head, config.head_dim
    qkv_bias = _bias_or_zeros(qkv, 3 * h * d, qkv.weight)
    for name, w, b in zip(
        ("q_proj", "k_proj", "v_proj"),
        _split_fused_per_head(qkv.weight, h, d),
        _split_fused_per_head(qkv_bias, h, d),
        strict=True,
    ):
        _linear(state, f"{p}.attn.{name}", w, b)
    _linear(state, f"{p}.attn.o_proj", dense.weight, _bias_or_zeros(dense, dense.weight.shape[0], dense.weight))


def _fused_blocks(state: dict, layers: Iterable[nn.Module], attn_name: str, config: TransformerConfig) -> None:
    """Map the decoder layers GPT-NeoX and BLOOM share: fused per-head QKV, ``dense_h_to_4h`` / ``dense_4h_to_h`` MLP.

    ``attn_name`` is the layer's attention attribute: ``attention`` (GPT-NeoX) or ``self_attention`` (BLOOM).
    """
    for i, layer in enumerate(layers):
        p, attn, mlp = f"blocks.{i}", getattr(layer, attn_name), layer.mlp
        _norm(state, f"{p}.norm_1", layer.input_layernorm)
        _norm(state, f"{p}.norm_2", layer.post_attention_layernorm)
        _fused_attention(state, p, attn.query_key_value, attn.dense, config)
        _linear(state, f"{p}.mlp.up_proj", mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias)
        _linear(state, f"{p}.mlp.down_proj", mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)


def _neox_state(hf: nn.Module, config: TransformerConfig) -> dict[str, torch.Tensor]:
    base, state = hf.gpt_neox, {}
    state["wte.weight"] = base.embed_in.weight
    _fused_blocks(state, base.layers, "attention", config)
    _norm(state, "norm_f", base.final_layer_norm)
    _head(state, hf, config)
    return state


def _bloom_state(hf: nn.Module, config: TransformerConfig) -> dict[str, torch.Tensor]:
    base, state = hf.transformer, {}
    state["wte.weight"] = base.word_embeddings.weight
    _norm(state, "emb_norm", base.word_embeddings_layernorm)
    _fused_blocks(state, base.h, "self_attention", config)
    _norm(state, "norm_f", base.ln_f)
    _head(state, hf, config)
    return state


def _gpt2_state(hf: nn.Module, config: TransformerConfig) -> dict[str, torch.Tensor]:
    base, state, cfg = hf.transformer, {}, hf.config
    c, d = config.n_embd, config.head_dim
    state["wte.weight"] = base.wte.weight
    state["wpe.weight"] = base.wpe.weight
    for i, layer in enumerate(base.h):
        p, attn, mlp = f"blocks.{i}", layer.attn, layer.mlp
        _norm(state, f"{p}.norm_1", layer.ln_1)
        _norm(state, f"{p}.norm_2", layer.ln_2)
        # Conv1D computes x @ W + b with W (in, out): our Linear weight is W.T
        q, k, v = attn.c_attn.weight.t().split(c, dim=0)  # 3 x (C, C)
        qb, kb, vb = attn.c_attn.bias.split(c, dim=0)  # 3 x (C,)
        # GPT-2's scale is 1/sqrt(D) (if scale_attn_weights) / (layer+1) (if scale_attn_by_inverse_layer_idx); ours is
        # always 1/sqrt(D), so the ratio is folded into the query projection (scores are linear in q)
        ratio = (1.0 if getattr(cfg, "scale_attn_weights", True) else math.sqrt(d)) / (
            i + 1.0 if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else 1.0
        )
        if ratio != 1.0:
            q, qb = q * ratio, qb * ratio
        _linear(state, f"{p}.attn.q_proj", q, qb)
        _linear(state, f"{p}.attn.k_proj", k, kb)
        _linear(state, f"{p}.attn.v_proj", v, vb)
        _linear(state, f"{p}.attn.o_proj", attn.c_proj.weight.t(), attn.c_proj.bias)
        _linear(state, f"{p}.mlp.up_proj", mlp.c_fc.weight.t(), mlp.c_fc.bias)
        _linear(state, f"{p}.mlp.down_proj", mlp.c_proj.weight.t(), mlp.c_proj.bias)
    _norm(state, "norm_f", base.ln_f)
    _head(state, hf, config)
    return state


_STATE_BUILDERS: dict[str, Callable[[nn.Module, TransformerConfig], dict[str, torch.Tensor]]] = {
    "llama": _llama_state,
    "gpt_neox": _neox_state,
    "bloom": _bloom_state,
    "gpt2": _gpt2_state,
}


def _materialise(config: TransformerConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Build a :class:`Transformer` holding exactly ``state`` without a wasted random initialisation."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers are not in a state dict: rebuild them on the weights' device
    device = model.wte.weight.device
    for module in model.modules():
        slopes = getattr(module, "alibi_slopes", None)
        if isinstance(slopes, torch.Tensor) and slopes.is_meta:
            from lightning_llm.nn.alibi import alibi_slopes

            module.alibi_slopes = alibi_slopes(config.n_head).to(device)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # an unknown buffer: fall back to the slow but generic path (materialise, initialise, copy)
        model = Transformer(config).to(device)
        model.load_state_dict(state, strict=True)
    return model


def _architecture(hf_model: Any) -> str:
    name = type(hf_model).__name__
    if name in SUPPORTED_ARCHITECTURES:
        return SUPPORTED_ARCHITECTURES[name]
    for cls in type(hf_model).__mro__:  # subclasses of a supported class convert like it
        if cls.__name__ in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[cls.__name__]
    raise ValueError(
        f"from_hf: unsupported Hugging Face architecture {name}; supported: {_supported_list()}. "
        "Load the causal-LM class (e.g. AutoModelForCausalLM), not a base model or another head."
    )


def _load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None) -> nn.Module:
    transformers = _require_transformers()
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        kwargs["dtype" if major_minor >= (4, 56) else "torch_dtype"] = dtype
    return transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)


def from_hf(
    hf_model_or_path: nn.Module | str | os.PathLike, dtype: torch.dtype | None = None, **overrides: Any
) -> Transformer:
    """Convert a Hugging Face causal LM into a :class:`~lightning_llm.nn.transformer.Transformer` with the same weights.

    Args:
        hf_model_or_path: a ``LlamaForCausalLM``, ``GPTNeoXForCausalLM``, ``BloomForCausalLM`` or ``GPT2LMHeadModel``
            instance, or a path (or hub name) given to ``transformers.AutoModelForCausalLM.from_pretrained``.
        dtype: dtype of the returned model's parameters (default: the Hugging Face model's).
        **overrides: TransformerConfig fields to override (e.g. ``attention_backend="eager"``, ``dropout=0.1``).

    Returns:
        A Transformer on the Hugging Face model's device, in its train/eval mode, with copies of its weights
        (the two models share no storage). ``model(input_ids)`` gives the same logits ``(B, T, V)``.

    Raises:
        ValueError: unsupported architecture or option. TypeError: neither a model nor a path.
    """
    if isinstance(hf_model_or_path, (str, os.PathLike)):
        hf_model = _load_pretrained(hf_model_or_path, dtype)
    elif isinstance(hf_model_or_path, nn.Module) and hasattr(hf_model_or_path, "config"):
        hf_model = hf_model_or_path
    else:
        raise TypeError(
            "from_hf: hf_model_or_path must be a Hugging Face PreTrainedModel or a local directory / hub name, got "
            f"{type(hf_model_or_path).__name__}."
        )
    arch = _architecture(hf_model)
    # the embedding table is the truth (a resized vocabulary may not have reached config.vocab_size)
    overrides.setdefault("vocab_size", hf_model.get_input_embeddings().weight.shape[0])
    config = config_from_hf(hf_model.config, **overrides)
    param = next(hf_model.parameters())
    dtype = dtype or param.dtype
    with torch.no_grad():
        state = _STATE_BUILDERS[arch](hf_model, config)
        state = {k: v.detach().to(dtype=dtype, copy=True) for k, v in state.items()}
    model = _materialise(config, state)
    return model.train(hf_model.training)


# ======================================================================================================== to_hf
#: What each Hugging Face architecture needs of a TransformerConfig (field -> value), besides the sizes of the fused
#: q/k/v layer of GPT-NeoX, BLOOM and GPT-2 and BLOOM's MLP width (checked in :func:`_shape_problems`).
_FUSED_NEEDS = {"lm_head_bias": False, "shared_attention_norm": False, "norm": "layernorm", "mlp": "gelu"}
_HF_NEEDS: dict[str, dict[str, Any]] = {
    "llama": {
        "pos_encoding": "rope",
        "partial_rotary_factor": 1.0,
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "parallel_residual": False,
        "embedding_norm": False,
        "lm_head_bias": False,
    },
    "gpt_neox": {**_FUSED_NEEDS, "pos_encoding": "rope", "embedding_norm": False, "rope_scaling": None},
    "bloom": {
        **_FUSED_NEEDS,
        "pos_encoding": "alibi",
        "embedding_norm": True,
        "parallel_residual": False,
        "gelu_approximate": "tanh",
    },
    "gpt2": {**_FUSED_NEEDS, "pos_encoding": "learned", "embedding_norm": False, "parallel_residual": False},
}


def _shape_problems(config: TransformerConfig) -> dict[str, list[str]]:
    """For each Hugging Face architecture, what in ``config`` it cannot represent (empty: it can)."""
    c = config
    fused_sizes = []  # one layer holds q, k and v of every head
    if c.n_kv_head != c.n_head:
        fused_sizes.append(f"n_kv_head={c.n_kv_head} != n_head (needs multi-head attention)")
    if c.head_dim * c.n_head != c.n_embd:
        fused_sizes.append(f"head_dim * n_head = {c.head_dim * c.n_head} != n_embd={c.n_embd}")
    problems = {arch: [] if arch == "llama" else list(fused_sizes) for arch in _HF_NEEDS}
    for arch, needs in _HF_NEEDS.items():
        problems[arch] += [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(c, k) != v]
    if c.intermediate_size != 4 * c.n_embd:
        problems["bloom"].append(f"intermediate_size={c.intermediate_size} (needs 4 * n_embd)")
    return problems


def hf_architecture(config: TransformerConfig) -> str:
    """The Hugging Face ``model_type`` that represents ``config`` exactly (``llama``, ``gpt_neox``, ``bloom``,
    ``gpt2``).

    Raises:
        ValueError: no supported architecture can (the message lists, for each, what does not fit).
    """
    problems = _shape_problems(config)
    for arch, found in problems.items():
        if not found:
            return arch
    detail = "; ".join(f"{arch}: " + ", ".join(found) for arch, found in problems.items())
    raise ValueError(
        "to_hf: this model matches no architecture Hugging Face can load (Llama-shaped, GPT-NeoX, BLOOM or GPT-2 "
        f"shaped). What does not fit each: {detail}. Train with one of those shapes to export, or keep the model in "
        "lightning_llm."
    )


def _interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute q/k projection rows so that the half (rotate_half) layout computes what interleaved did.

    Interleaved rotates pairs (2i, 2i+1) by angle i, half rotates (i, i + D/2): row i of the new head is old row 2i and
    row i + D/2 is old row 2i + 1. q.k is unchanged because q and k are permuted alike.
    """
    perm = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim, *rest)[:, perm].reshape(n_heads * head_dim, *rest)  # (H*D, ...)


def _hf_rope_scaling(config: TransformerConfig) -> tuple[dict[str, Any] | None, int]:
    """Hugging Face ``rope_scaling`` dict and ``max_position_embeddings`` reproducing our RoPE."""
    scaling = config.rope_scaling
    if scaling is None:
        return None, config.block_size
    kind = scaling["type"]
    out = {k: scaling[k] for k in _ROPE_KEYS if scaling.get(k) is not None}
    out["rope_type"] = kind
    original = scaling.get("original_max_position_embeddings") or config.block_size
    max_pos = config.block_size
    if kind == "dynamic":  # HF's dynamic NTK grows past max_position_embeddings
        out.pop("original_max_position_embeddings", None)
        max_pos = original
    elif kind in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = original
    if kind == "llama3":  # lightning_llm.nn.rope's defaults; HF requires them spelled out
        out.setdefault("low_freq_factor", 1.0)
        out.setdefault("high_freq_factor", 4.0)
    return out, max_pos


def _rotary_perm(head_dim: int, rope_dim: int) -> torch.Tensor:
    """Row order turning the interleaved layout of the first ``rope_dim`` dims into the half layout."""
    return torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2), torch.arange(rope_dim, head_dim)))


def _to_half_layout(t: torch.Tensor, config: TransformerConfig, n_heads: int) -> torch.Tensor:
    if config.pos_encoding != "rope" or config.rope_layout != "interleaved":
        return t
    d, rest = config.head_dim, t.shape[1:]
    perm = _rotary_perm(d, config.rope_dim)
    return t.reshape(n_heads, d, *rest)[:, perm].reshape(n_heads * d, *rest)  # (H*D, ...)


def _common_hf_kwargs(config: TransformerConfig, *dropouts: str) -> dict[str, Any]:
    """Config arguments every architecture takes, plus its dropout probabilities (named ``dropouts``) set to ours."""
    return dict(
        vocab_size=config.vocab_size,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **dict.fromkeys(dropouts, config.dropout),
    )


def _rope_model_kwargs(config: TransformerConfig, *dropouts: str) -> dict[str, Any]:
    """Config arguments of Llama and GPT-NeoX: the common ones and the sizes :data:`_ROPE_MODEL_FIELDS` names."""
    return _common_hf_kwargs(config, *dropouts) | {hf: getattr(config, ours) for ours, hf in _ROPE_MODEL_FIELDS.items()}


def _fuse_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`_split_fused_per_head`: q, k, v ``(H*D, ...)`` -> ``(H*3*D, ...)`` ordered ``(H, 3, D)``."""
    rest = q.shape[1:]
    parts = [t.reshape(n_head, head_dim, *rest) for t in (q, k, v)]  # 3 x (H, D, ...)
    return torch.stack(parts, dim=1).reshape(n_head * 3 * head_dim, *rest)  # (H*3*D, ...)


def _bias_of(src: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """``name.bias``, or zeros when the model has no biases (exact: a zero bias adds nothing)."""
    bias = src.get(f"{name}.bias")
    return bias if bias is not None else torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)


def _linear_of(src: dict[str, torch.Tensor], name: str, config: TransformerConfig) -> tuple[torch.Tensor, ...]:
    """Weight and bias (zeros if absent) of our linear layer ``name``; q/k rows in Hugging Face's half RoPE layout."""
    w = src[f"{name}.weight"]
    b = _bias_of(src, name, w)
    if name.endswith(("q_proj", "k_proj")):
        heads = config.n_head if name.endswith("q_proj") else config.n_kv_head
        w, b = _to_half_layout(w, config, heads), _to_half_layout(b, config, heads)
    return w, b


def _norm_out(state: dict, src: dict[str, torch.Tensor], ours: str, theirs: str) -> None:
    """Copy our norm ``ours`` to ``theirs``: the weight, and the bias of a LayerNorm."""
    for kind in ("weight", "bias"):
        if f"{ours}.{kind}" in src:
            state[f"{theirs}.{kind}"] = src[f"{ours}.{kind}"]


def _ends_out(
    config: TransformerConfig, src: dict[str, torch.Tensor], embed: str, final_norm: str, head: str = "lm_head"
) -> dict[str, torch.Tensor]:
    """The embedding, final norm and output head of an exported model, a padded vocabulary cut to ``vocab_size``."""
    v = config.vocab_size
    state = {f"{embed}.weight": src["wte.weight"][:v]}
    _norm_out(state, src, "norm_f", final_norm)
    state[f"{head}.weight"] = (src["wte.weight"] if config.tie_embeddings else src["lm_head.weight"])[:v]
    return state


def _llama_out(config: TransformerConfig, src: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    scaling, max_pos = _hf_rope_scaling(config)
    kwargs = dict(
        _rope_model_kwargs(config, "attention_dropout"),
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        rope_scaling=scaling,
        attention_bias=config.bias,
        mlp_bias=config.bias,
    )
    state = _ends_out(config, src, "model.embed_tokens", "model.norm")
    for i in range(config.n_layer):
        p, q = f"blocks.{i}", f"model.layers.{i}"
        _norm_out(state, src, f"{p}.norm_1", f"{q}.input_layernorm")
        _norm_out(state, src, f"{p}.norm_2", f"{q}.post_attention_layernorm")
        for part, hf_part, names in (("attn", "self_attn", _LLAMA_ATTN), ("mlp", "mlp", _LLAMA_MLP)):
            for name in names:
                w, b = _linear_of(src, f"{p}.{part}.{name}", config)
                state[f"{q}.{hf_part}.{name}.weight"] = w
                if config.bias:
                    state[f"{q}.{hf_part}.{name}.bias"] = b
    return "LlamaForCausalLM", kwargs, state


_HF_GELU = {"none": "gelu", "tanh": "gelu_new"}


def _fused_names(attn: str) -> dict[str, str]:
    """Our names -> GPT-NeoX's (``attn="attention"``) or BLOOM's (``"self_attention"``) in a decoder layer."""
    return {
        "norm_1": "input_layernorm",
        "norm_2": "post_attention_layernorm",
        "qkv": f"{attn}.query_key_value",
        "attn.o_proj": f"{attn}.dense",
        "mlp.up_proj": "mlp.dense_h_to_4h",
        "mlp.down_proj": "mlp.dense_4h_to_h",
    }


_GPT2_NAMES = {
    "norm_1": "ln_1",
    "norm_2": "ln_2",
    "qkv": "attn.c_attn",
    "attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}


def _fused_layers_out(
    config: TransformerConfig, src: dict[str, torch.Tensor], prefix: str, names: dict[str, str], conv1d: bool = False
) -> dict[str, torch.Tensor]:
    """GPT-NeoX / BLOOM / GPT-2 decoder layers ``prefix.{i}``, our layers renamed by ``names`` (``qkv``: the one layer
    holding q, k and v), every bias written (zeros where we have none).

    GPT-NeoX and BLOOM fuse q, k, v per head (``(H, 3, D)`` rows); GPT-2 (``conv1d``) concatenates them, and its
    ``Conv1D`` layers store the transpose of our weights.
    """
    h, d, state = config.n_head, config.head_dim, {}
    fuse = torch.cat if conv1d else lambda qkv: _fuse_per_head(*qkv, h, d)
    for i in range(config.n_layer):
        p, q = f"blocks.{i}", f"{prefix}.{i}"
        _norm_out(state, src, f"{p}.norm_1", f"{q}.{names['norm_1']}")
        _norm_out(state, src, f"{p}.norm_2", f"{q}.{names['norm_2']}")
        ws, bs = zip(*(_linear_of(src, f"{p}.attn.{n}", config) for n in ("q_proj", "k_proj", "v_proj")), strict=True)
        layers = {"qkv": (fuse(ws), fuse(bs))}
        for ours in ("attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            layers[ours] = _linear_of(src, f"{p}.{ours}", config)
        for ours, (w, b) in layers.items():
            state[f"{q}.{names[ours]}.weight"] = w.t() if conv1d else w
            state[f"{q}.{names[ours]}.bias"] = b
    return state


def _neox_out(config: TransformerConfig, src: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    kwargs = dict(
        _rope_model_kwargs(config, "attention_dropout", "hidden_dropout"),
        hidden_act=_HF_GELU[config.gelu_approximate],
        max_position_embeddings=config.block_size,
        layer_norm_eps=config.norm_eps,
        use_parallel_residual=config.parallel_residual,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": config.rope_base,
            "partial_rotary_factor": config.partial_rotary_factor,
        },
        attention_bias=True,
    )
    state = _ends_out(config, src, "gpt_neox.embed_in", "gpt_neox.final_layer_norm", head="embed_out")
    state.update(_fused_layers_out(config, src, "gpt_neox.layers", _fused_names("attention")))
    return "GPTNeoXForCausalLM", kwargs, state


def _bloom_out(config: TransformerConfig, src: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    kwargs = dict(
        _common_hf_kwargs(config, "hidden_dropout", "attention_dropout"),
        hidden_size=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        layer_norm_epsilon=config.norm_eps,
        seq_length=config.block_size,  # BLOOM has no position table; from_hf reads the context length back from it
    )
    state = _ends_out(config, src, "transformer.word_embeddings", "transformer.ln_f")
    _norm_out(state, src, "emb_norm", "transformer.word_embeddings_layernorm")
    state.update(_fused_layers_out(config, src, "transformer.h", _fused_names("self_attention")))
    return "BloomForCausalLM", kwargs, state


def _gpt2_out(config: TransformerConfig, src: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    kwargs = dict(
        _common_hf_kwargs(config, "resid_pdrop", "embd_pdrop", "attn_pdrop"),
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.intermediate_size,
        activation_function=_HF_GELU[config.gelu_approximate],
        layer_norm_epsilon=config.norm_eps,
    )
    state = _ends_out(config, src, "transformer.wte", "transformer.ln_f")
    state["transformer.wpe.weight"] = src["wpe.weight"]
    state.update(_fused_layers_out(config, src, "transformer.h", _GPT2_NAMES, conv1d=True))
    return "GPT2LMHeadModel", kwargs, state


_TO_HF: dict[str, Callable[[TransformerConfig, dict[str, torch.Tensor]], tuple[str, dict, dict]]] = {
    "llama": _llama_out,
    "gpt_neox": _neox_out,
    "bloom": _bloom_out,
    "gpt2": _gpt2_out,
}


def to_hf(model: Transformer, **hf_config_kwargs: Any):
    """Convert a :class:`Transformer` into the Hugging Face causal LM that represents it, with the same logits.

    The architecture is chosen by :func:`hf_architecture`:

    * ``LlamaForCausalLM``: RoPE over the whole head, RMSNorm, SwiGLU, sequential residual (grouped-query heads, rope
      scaling, projection biases as ``attention_bias=mlp_bias=True``);
    * ``GPTNeoXForCausalLM``: RoPE (partial rotary allowed), LayerNorm, GELU, sequential or parallel residual;
    * ``BloomForCausalLM``: ALiBi, embedding LayerNorm, tanh GELU, MLP width 4 C;
    * ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU.

    An interleaved RoPE layout is permuted into Hugging Face's half layout; a model without biases gets zero biases
    where the Hugging Face architecture always has them (exact); a padded vocabulary is cut back to ``vocab_size``.

    Args:
        model: the model to convert.
        **hf_config_kwargs: extra config arguments (``bos_token_id``, ``eos_token_id``, ``pad_token_id``,
            ``attn_implementation``, ...); token ids default to None.

    Returns:
        The Hugging Face model on the model's device and dtype, in the model's train/eval mode.

    Raises:
        ValueError: an architecture Hugging Face cannot represent (see :func:`hf_architecture`).
    """
    transformers = _require_transformers()
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if not isinstance(model, Transformer):
        raise TypeError(f"to_hf: model must be a lightning_llm.nn.Transformer, got {type(model).__name__}.")
    from lightning_llm.nn.lora import has_lora

    if has_lora(model):
        raise ValueError(
            "to_hf: the model holds LoRA adapters; merge them first (lightning_llm.nn.lora.merge_lora) or export the "
            "base and the adapters separately (lightning-llm export of the LoRA checkpoint)."
        )
    config = model.config
    arch = hf_architecture(config)
    src = model.state_dict()
    class_name, kwargs, state = _TO_HF[arch](config, src)
    kwargs.update(hf_config_kwargs)
    config_cls = {"llama": "LlamaConfig", "gpt_neox": "GPTNeoXConfig", "bloom": "BloomConfig", "gpt2": "GPT2Config"}
    hf_config = getattr(transformers, config_cls[arch])(**kwargs)
    hf_config.architectures = [class_name]
    param = model.wte.weight
    hf = getattr(transformers, class_name)(hf_config).to(device=param.device, dtype=param.dtype)
    own = hf.state_dict()
    if "embed_out.weight" in state and "embed_out.weight" not in own:  # GPT-NeoX's head is `lm_head` in 5.x
        state["lm_head.weight"] = state.pop("embed_out.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    params = dict(hf.named_parameters(remove_duplicate=False))
    missing = [k for k in missing if k in params and not (config.tie_embeddings and k in _TIED_HEADS)]
    if missing or unexpected:  # pragma: no cover - a transformers layout change
        raise RuntimeError(f"to_hf: {class_name} layout mismatch: missing {missing}, unexpected {unexpected}.")
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.train(model.training)


_TIED_HEADS = ("lm_head.weight", "embed_out.weight")


def _save_tokenizer(tokenizer: Any, directory: Path, chat_template: str | None = None) -> Any:
    """Save ``tokenizer`` as a Hugging Face tokenizer; ``chat_template`` (else, for a tokenizer without one, this
    project's :data:`~lightning_llm.data.preference.DEFAULT_CHAT_TEMPLATE`) goes into its config."""
    if hasattr(tokenizer, "save_pretrained"):
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(directory)
        return tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = ()  # noqa: N806
    special: dict[str, str] = {}
    if hasattr(tokenizer, "backend") and hasattr(tokenizer, "special_ids"):  # our lightning_llm Tokenizer
        for name, token_id in tokenizer.special_ids.items():  # eos_id / bos_id / pad_id -> eos_token ...
            if token_id is not None:
                special[name.replace("_id", "_token")] = tokenizer.backend.id_to_token(token_id)
        tokenizer = tokenizer.backend
    if isinstance(tokenizer, Tokenizer):
        from transformers import PreTrainedTokenizerFast

        from lightning_llm.data.preference import DEFAULT_CHAT_TEMPLATE

        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
        wrapped.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE  # how our data modules render conversations
        wrapped.save_pretrained(directory)
        return wrapped
    raise TypeError(
        "save_hf: tokenizer must be a Hugging Face tokenizer (with save_pretrained) or a tokenizers.Tokenizer, got "
        f"{type(tokenizer).__name__}."
    )


def save_hf(
    model: Transformer,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    chat_template: str | None = None,
    **hf_config_kwargs: Any,
) -> Path:
    """Write a Hugging Face checkpoint directory (``config.json``, weights, optional tokenizer) for ``model``.

    The directory loads back with ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` (and
    ``AutoTokenizer.from_pretrained`` when a tokenizer was given), or with :func:`from_hf`.

    Args:
        model: a :class:`Transformer` Hugging Face can represent (see :func:`to_hf`).
        directory: output directory (created if needed).
        tokenizer: optional Hugging Face tokenizer, ``tokenizers.Tokenizer`` or our
            :class:`~lightning_llm.data.Tokenizer` to save beside the weights; its
            bos/eos/pad ids go into the config unless given in ``hf_config_kwargs``.
        chat_template: a Jinja chat template to store with the tokenizer (default: the tokenizer's own; for this
            project's tokenizers, :data:`~lightning_llm.data.preference.DEFAULT_CHAT_TEMPLATE`).
        **hf_config_kwargs: extra config arguments, as for :func:`to_hf`.

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    _require_transformers()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved_tokenizer = _save_tokenizer(tokenizer, directory, chat_template) if tokenizer is not None else None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(saved_tokenizer, key, None)
        if value is not None:
            hf_config_kwargs.setdefault(key, value)
    hf = to_hf(model, **hf_config_kwargs)
    hf.save_pretrained(directory)
    return directory


# ======================================================================================================== LoRA adapters
def _lora_layout(model: Transformer) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(LoraConfig kwargs, {our module name: (A (r, in), B (out, r))})`` of the peft LoRA layers in ``model``."""
    from lightning_llm.nn.lora import lora_layers

    names = {id(m): n for n, m in model.named_modules()}
    adapters, settings = {}, []
    for layer in lora_layers(model):
        r, alpha = layer.r["default"], layer.lora_alpha["default"]
        drop = layer.lora_dropout["default"]
        rslora = math.isclose(layer.scaling["default"], alpha / math.sqrt(r)) and r != 1
        settings.append((r, alpha, getattr(drop, "p", 0.0), rslora))
        adapters[names[id(layer)]] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    if len(set(settings)) != 1:
        raise ValueError(
            f"save_lora_adapter: the adapters differ in (r, alpha, dropout, rslora): {sorted(set(settings))}."
        )
    r, alpha, dropout, rslora = settings[0]
    targets = sorted({n.rsplit(".", 1)[-1] for n in adapters})
    return dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, target_modules=targets), adapters


def base_of_lora(model: Transformer) -> Transformer:
    """A new :class:`Transformer` holding the base weights of a LoRA model (adapters dropped, not merged)."""
    state = {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in model.state_dict().items()
        if ".lora_A." not in k and ".lora_B." not in k and "lora_embedding" not in k
    }
    return _materialise(model.config, state)


def save_lora_adapter(
    model: Transformer, directory: str | os.PathLike, tokenizer: Any = None, chat_template: str | None = None
) -> Path:
    """Write the base of a LoRA model as a Hugging Face model in ``directory`` and its adapters as a ``peft`` adapter
    in ``directory/adapter``: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory),
    directory/adapter)`` computes what ``model`` does.

    The adapters are written by ``peft`` itself (``get_peft_model`` on the exported base, the weights copied in,
    ``save_pretrained``). Llama-shaped models only: GPT-NeoX, BLOOM and GPT-2 fuse q/k/v into one layer, which our
    separate q/k/v adapters do not map onto; merge the adapters instead (``export --merge true``).
    """
    from peft import LoraConfig, get_peft_model

    directory = Path(directory)
    base = base_of_lora(model)
    if hf_architecture(base.config) != "llama":
        raise ValueError(
            f"save_lora_adapter: adapters export onto Llama-shaped bases only; this base is "
            f"{hf_architecture(base.config)!r}, whose fused q/k/v layer has no separate q_proj/k_proj/v_proj. Export "
            "with the adapters merged (lightning-llm export --merge true)."
        )
    save_hf(base, directory, tokenizer=tokenizer, chat_template=chat_template)
    kwargs, adapters = _lora_layout(model)
    hf = to_hf(base)
    peft_model = get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", **kwargs))
    config = base.config
    hf_modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            parts = name.split(".")
            if parts[0] == "blocks":  # blocks.{i}.{attn|mlp}.{proj}
                part = "self_attn" if parts[2] == "attn" else "mlp"
                hf_name = f"base_model.model.model.layers.{parts[1]}.{part}.{parts[3]}"
            else:  # lm_head
                hf_name = f"base_model.model.{name}"
            if parts[-1] in ("q_proj", "k_proj"):
                b = _to_half_layout(b, config, config.n_head if parts[-1] == "q_proj" else config.n_kv_head)
            target = hf_modules[hf_name]
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(directory / "adapter")
    return directory
