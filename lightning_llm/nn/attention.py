"""Causal self-attention with multi-head, grouped-query and multi-query heads, and three kernels.

Notation: B batch, T new tokens, S key slots (past + new), H query heads, G key/value heads, D head dim, C width.

Kernels (``TransformerConfig.attention_backend``):

* ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention`. With no bias and no padding it is called
  with ``is_causal=True`` and no mask, which lets CUDA take the flash kernel. Otherwise it gets a mask: boolean for
  padding/KV cache, float (already containing the causal ``-inf``) for ALiBi.
* ``flex``: FlexAttention with ALiBi as a ``score_mod`` and causality as a ``block_mask`` (compiled; CUDA only in
  ``auto`` mode because unfused eager Flex on CPU is slow).
* ``eager``: plain ``softmax(q k^T / sqrt(D) + bias) v`` in float32, the readable reference the tests compare with.

``auto`` takes flex for ALiBi on CUDA when there is no padding or cache, and sdpa everywhere else.
Every query may always attend to its own slot, so a left-padded row never has an empty softmax (which would be NaN);
such pad positions produce finite garbage that no loss or metric reads.

ALiBi slopes live in the non-persistent buffer ``alibi_slopes``, one per head this module computes: ``(H,)`` as built.
A tensor-parallel plan that gives this module only some of the heads slices the buffer with the projections
(:func:`lightning_llm.parallel.shard_alibi_slopes`); the module itself never needs to know which heads it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.alibi import alibi_bias, alibi_slopes
from lightning_llm.nn.rope import apply_rope


@dataclass
class AttentionInputs:
    """What every block needs to attend, computed once per forward by the Transformer.

    Attributes:
        cos, sin: RoPE tables for the new tokens, ``(B or 1, T, R)``, or ``None``.
        mask: boolean ``(B or 1, 1, T, S)`` (True = may attend) or ``None`` when plain causal attention applies.
        q_pos, k_pos: positions ``(B or 1, T)`` and ``(B or 1, S)``, used for ALiBi.
        is_causal: with ``mask`` None, True for the plain lower triangle, False for one new query that sees every slot.
        cache: per-forward memo shared by all blocks (the ALiBi bias is built once, not once per layer).
        cache_slot: ``None`` (the KV cache, if any, grows: :meth:`KVCache.update`), or a ``(1,)`` long tensor: the
            static decoding step writes its one token per row at this slot (:meth:`KVCache.write`) and attends over
            the cache's first ``S = k_pos.shape[-1]`` slots: all ``S_max`` when compiled (fixed shapes), only the
            written ones when eager (nothing read that the mask would hide); ``mask`` ``(B, 1, 1, S)`` hides the
            padding and, compiled, the slots not yet written.
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    mask: torch.Tensor | None
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    is_causal: bool
    cache: dict = field(default_factory=dict)
    cache_slot: torch.Tensor | None = None


_compiled_flex = None
_block_masks: dict = {}


def _flex_attention():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c, d = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, d
        self.q_proj = nn.Linear(c, config.n_head * d, bias=config.bias)
        self.k_proj = nn.Linear(c, config.n_kv_head * d, bias=config.bias)
        self.v_proj = nn.Linear(c, config.n_kv_head * d, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * d, c, bias=config.bias)
        self.dropout = config.dropout
        if config.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None, layer_idx: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        # local head counts (tensor parallelism shards the projections; views use -1 for the head axis)
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        if inputs.cos is not None:
            layout = self.config.rope_layout
            q = apply_rope(q, inputs.cos, inputs.sin, layout)
            k = apply_rope(k, inputs.cos, inputs.sin, layout)
        if kv_cache is not None:
            if inputs.cache_slot is not None:
                k, v = kv_cache.write(layer_idx, k, v, inputs.cache_slot)  # (B, G, S_max, D)
                s = inputs.k_pos.shape[-1]  # the slots this step reads (see AttentionInputs.cache_slot)
                k, v = k[:, :, :s], v[:, :, :s]  # (B, G, S, D)
            else:
                k, v = kv_cache.update(layer_idx, k, v)  # (B, G, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float32 cache under autocast: match the query's dtype
        y = self.attend(q, k, v, inputs)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
        return self.o_proj(y)

    # ----------------------------------------------------------------------------------------------------------------
    def backend(self, inputs: AttentionInputs, device: torch.device) -> str:
        choice = self.config.attention_backend
        if choice != "auto":
            return choice
        if (
            self.alibi_slopes is not None
            and device.type == "cuda"
            and inputs.mask is None
            and inputs.is_causal
            and not (self.training and self.dropout > 0)
            and flex_available()
        ):
            return "flex"
        return "sdpa"

    def _alibi_slopes(self, n_heads: int, device: torch.device) -> torch.Tensor:
        """The ``(H,)`` slopes of the heads in ``q``; they must match in number (a sharded plan slices both)."""
        slopes = self.alibi_slopes
        if slopes.numel() != n_heads:
            raise ValueError(
                f"`alibi_slopes` holds {slopes.numel()} slopes but the query projection gives {n_heads} heads: when "
                "q/k/v are sharded over heads, slice the slopes the same way "
                "(lightning_llm.parallel.shard_alibi_slopes; apply_tensor_parallel does it)."
            )
        return slopes.to(device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        n_local = q.shape[1]
        backend = self.backend(inputs, q.device)
        dropout = self.dropout if self.training else 0.0
        # FlexAttention here covers ALiBi with plain causal attention over as many keys as queries and no dropout;
        # anything else (padding, a KV cache, dropout, no ALiBi) takes the SDPA path, which handles every case.
        if (
            backend == "flex"
            and self.alibi_slopes is not None
            and inputs.mask is None
            and inputs.is_causal
            and q.shape[-2] == k.shape[-2]
            and dropout == 0.0
        ):
            return self._flex(q, k, v, self._alibi_slopes(n_local, q.device))
        if inputs.cache_slot is not None and backend != "eager" and dropout == 0.0 and torch.compiler.is_compiling():
            return self._decode(q, k, v, inputs, n_local)
        if k.shape[1] != n_local:  # grouped-query: repeat each kv head for its group of query heads
            rep = n_local // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        bias = self._bias(inputs, n_local, q.device)
        if backend == "eager":
            return self._eager(q, k, v, inputs, bias, dropout)
        if bias is None and inputs.mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=inputs.is_causal)
        if bias is None:
            attn_mask = inputs.mask
        else:
            key = ("alibi_bias_as", q.dtype, n_local)
            attn_mask = inputs.cache.get(key)
            if attn_mask is None:
                attn_mask = inputs.cache[key] = bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)

    def _bias(self, inputs: AttentionInputs, n_local: int, device: torch.device) -> torch.Tensor | None:
        """ALiBi bias with the causal/padding mask folded in as ``-inf``: float32 ``(B or 1, H, T, S)``."""
        if self.alibi_slopes is None:
            return None
        slopes = self._alibi_slopes(n_local, device)
        key = ("alibi_bias", n_local, device)
        if key in inputs.cache:  # every layer of a model holds the same (local) slopes: build the bias once per forward
            return inputs.cache[key]
        bias = alibi_bias(slopes, inputs.q_pos, inputs.k_pos)  # (B or 1, H, T, S)
        mask = inputs.mask
        if mask is None:  # plain causal: key slot j <= query slot i
            t, s = bias.shape[-2:]
            mask = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)
        bias = bias.masked_fill(~mask, float("-inf"))
        inputs.cache[key] = bias
        return bias

    def _decode(self, q, k, v, inputs: AttentionInputs, n_local: int) -> torch.Tensor:
        """One query per row over the whole static cache: ``q`` ``(B, H, 1, D)``, ``k, v`` ``(B, G, S_max, D)``.

        Written out as two batched matrix products with the ``H / G`` query heads of a group as the rows of one
        product, so grouped-query attention reads each cached key once and never repeats the cache; the scores are
        ``(B, H, 1, S_max)``, small for one query, and the softmax runs in float32. Used only inside
        ``torch.compile`` (the static decode step of :func:`~lightning_llm.nn.generation.generate`): Inductor fuses
        the products, mask, scaling and softmax into one loop nest, about 3x faster on CPU (measured at the rollout
        benchmark's size) than its call of SDPA's flash kernel, which is built for long query blocks. Eagerly, SDPA is
        as fast or faster (measured for 16-64 rows, 23-96 slots), so the eager step takes the SDPA path below.
        """
        b, _, _, d = q.shape
        g, s = k.shape[1], k.shape[2]
        qg = q.reshape(b, g, n_local // g, d)  # (B, G, H/G, D)
        scores = (qg @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))  # (B, G, H/G, S)
        scores = scores.reshape(b, n_local, 1, s)  # (B, H, 1, S)
        bias = self._bias(inputs, n_local, q.device)
        if bias is not None:  # ALiBi with the mask folded in as -inf
            scores = scores + bias
        else:
            scores = scores.masked_fill(~inputs.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).reshape(b, g, n_local // g, s)  # (B, G, H/G, S)
        return (probs @ v).reshape(b, n_local, 1, d)  # (B, H, 1, D)

    def _eager(self, q, k, v, inputs: AttentionInputs, bias, dropout: float) -> torch.Tensor:
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        if bias is not None:
            scores = scores + bias
        else:
            mask = inputs.mask
            if mask is None:
                t, s = scores.shape[-2:]
                mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=dropout > 0)
        return (probs @ v.float()).to(q.dtype)

    def _flex(self, q, k, v, slopes: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        t, s = q.shape[-2], k.shape[-2]
        key = (t, s, str(q.device))
        block_mask = _block_masks.get(key)
        if block_mask is None:  # building a block mask costs a kernel launch and a sync: once per shape
            block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=t, KV_LEN=s, device=q.device)
            _block_masks[key] = block_mask
        enable_gqa = k.shape[1] != q.shape[1]
        return _flex_attention()(q, k, v, score_mod=alibi, block_mask=block_mask, enable_gqa=enable_gqa)
