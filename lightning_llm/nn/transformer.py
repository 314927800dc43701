"""A decoder-only transformer, driven by :class:`~lightning_llm.config.TransformerConfig`.

Notation: B batch, T new tokens, S key slots (past + new), C width, V vocabulary, R rotated dims.

Read bottom-up: :class:`Transformer` embeds tokens, computes positions/masks once (:meth:`Transformer.attention_inputs`),
runs the :class:`Block` stack and projects to the vocabulary. Positions always come from the attention mask's
cumulative sum when a mask is given, so left padding changes no real token's output (RoPE, ALiBi, learned and
sinusoidal alike).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.attention import AttentionInputs, CausalSelfAttention
from lightning_llm.nn.heads import chunked_cross_entropy
from lightning_llm.nn.kv_cache import KVCache
from lightning_llm.nn.rope import rope_cos_sin
from lightning_llm.ops import is_plain

_HAS_FUSED_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, normalised in float32 and cast back before the weight (as Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _HAS_FUSED_RMS_NORM
            and x.dtype == self.weight.dtype == torch.float32
            and is_plain(x)
            and is_plain(self.weight)
        ):
            # the same formula in one fused kernel (forward and backward): float32 in, nothing to cast
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


# ------------------------------------------------------------------------------------------------ lean activations
def _outer_hooks() -> tuple[bool, _RecomputeState | None]:
    """``(usable, outer)``: whether a block may install its own saved-tensor hooks, and the enclosing
    :func:`recompute_saved` it then delegates to. Not while ``torch.compile`` traces (its partitioner decides what to
    keep), and not inside anyone else's saved-tensor hooks (activation checkpointing, CPU offload), which must keep
    seeing every saved tensor. Unknown (a torch without these queries): not usable."""
    if torch.compiler.is_compiling():
        return False, None
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    try:
        if top is None or enabled is None or not enabled():
            return False, None
        hooks = top(False)  # the innermost (pack, unpack) pair, None without any
    except (TypeError, RuntimeError):  # a private query whose signature changed
        return False, None
    if hooks is None:
        return True, None
    outer = getattr(hooks[0], "__self__", None)
    return (True, outer) if isinstance(outer, _RecomputeState) else (False, None)


class _Recomputed:
    """What autograd keeps instead of a saved tensor that lives in the storage of a cheap-to-recompute activation."""

    __slots__ = ("offset", "size", "state", "stride")

    def __init__(self, state: _RecomputeState, t: torch.Tensor) -> None:
        self.state, self.size, self.stride = state, t.size(), t.stride()
        self.offset = t.storage_offset() - state.offset


class _RecomputeState:
    """Shared by the markers of one activation: rebuilds it once per backward (on the first unpack) and drops it after
    the last."""

    __slots__ = ("device", "dtype", "fn", "offset", "outer", "packs", "ptr", "shape", "unpacks", "value")

    def __init__(self, value: torch.Tensor, fn: Callable[[], torch.Tensor], outer: _RecomputeState | None) -> None:
        self.fn, self.outer = fn, outer  # outer: the enclosing recompute_saved (a norm output around the MLP's)
        self.ptr, self.offset = value.untyped_storage().data_ptr(), value.storage_offset()
        self.shape, self.dtype, self.device = value.shape, value.dtype, value.device
        self.packs = self.unpacks = 0
        self.value: torch.Tensor | None = None

    def pack(self, t: torch.Tensor) -> object:
        if (
            is_plain(t)
            and t.layout == torch.strided
            and t.dtype == self.dtype
            and t.device == self.device
            and t.untyped_storage().data_ptr() == self.ptr
        ):
            self.packs += 1
            return _Recomputed(self, t)
        if self.outer is not None:
            return self.outer.pack(t)
        # Not ``t`` itself: when ``t`` is the output of the op saving it (SDPA's output, a softmax), the saved value
        # would hold its own ``grad_fn``, the node holding the saved value: a cycle through C++ that Python's garbage
        # collector cannot see, so a forward never followed by a backward (an evaluation with gradients enabled, a
        # skipped step) would keep its whole graph and activations alive forever. A detached alias shares storage
        # and version counter; autograd restores the autograd history it saved itself when unpacking.
        return t.detach()

    @staticmethod
    def unpack(packed: object) -> torch.Tensor:
        if not isinstance(packed, _Recomputed):
            return packed
        state = packed.state
        if state.value is None:
            with torch.no_grad():
                value = state.fn().contiguous()
            if value.shape != state.shape or value.dtype != state.dtype:
                raise RuntimeError(
                    f"recomputing a saved activation gave {tuple(value.shape)} {value.dtype}, expected "
                    f"{tuple(state.shape)} {state.dtype}: the recomputation must repeat the forward's formula."
                )
            state.value = value
        out = state.value.as_strided(packed.size, packed.stride, state.value.storage_offset() + packed.offset)
        state.unpacks += 1
        if state.unpacks >= state.packs:  # the last use in this backward: free it (a retained graph recomputes again)
            state.value, state.unpacks = None, 0
        return out


def recompute_saved(value: torch.Tensor, fn: Callable[[], torch.Tensor]) -> contextlib.AbstractContextManager:
    """Within the block, autograd saves no tensor living in ``value``'s storage; the backward rebuilds ``value`` with
    ``fn()`` (under no_grad) when it first needs it, and frees it after its last use.

    Design choice: for activations that are one cheap elementwise step from tensors autograd keeps anyway (a norm's
    output from its input, ``silu(gate) * up`` from ``gate`` and ``up``), storing them costs memory in proportion to
    the tokens (about a third of a block's saved activations) while rebuilding them costs a few elementwise passes,
    nothing next to the matmuls that consume them. ``fn`` must repeat the forward's computation exactly (same inputs,
    same ops), so the rebuilt tensor is bit-identical. A saved-tensor hook, not a custom autograd function, so any
    consumer (``nn.Linear``, peft's LoRA layers, attention) is covered without knowing it; the rebuilt tensor is
    handed back with the saved one's autograd history, so double backward still works. Nested uses (the MLP's inside
    the block's) delegate outwards. A no-op (nothing changes) without gradients, under ``torch.compile`` tracing,
    inside other saved-tensor hooks (activation checkpointing already keeps only the block input), and for tensor
    subclasses (DTensor).
    """
    if (
        not torch.is_grad_enabled()
        or not is_plain(value)
        or value.layout != torch.strided
        or value.numel() == 0
        or value.device.type == "meta"
        or not value.is_contiguous()
    ):
        return contextlib.nullcontext()
    usable, outer = _outer_hooks()
    if not usable:
        return contextlib.nullcontext()
    state = _RecomputeState(value, fn, outer)
    return torch.autograd.graph.saved_tensors_hooks(state.pack, _RecomputeState.unpack)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` that saves only ``gate`` and ``up`` (autograd's ``F.silu(gate) * up`` also keeps
    ``silu(gate)``: one more ``(B, T, I)`` tensor a layer, the largest activations of a block).

    Backward, with ``s = sigmoid(gate)``: ``d up = d out * gate * s`` and
    ``d gate = d out * up * (s - s * silu + silu)`` (``silu' = s + gate s (1 - s)``), in two buffers that become the
    two gradients (autograd's formula needs four ``(B, T, I)`` temporaries); computed in float32 for half-precision
    inputs (as autograd's own ``silu_backward``).
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # the values of F.silu(gate) * up, without a second (B, T, I) buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # double backward (create_graph=True): the same formula, out of place
            s = torch.sigmoid(gate)
            silu = gate * s
            grad_gate = grad * up * (s + silu * (1 - s)) if need_gate else None
            return grad_gate, (grad * silu if need_up else None)
        wide = gate.dtype in (torch.float16, torch.bfloat16)
        g, u, d = (t.float() for t in (gate, up, grad)) if wide else (gate, up, grad)
        # two (B, T, I) buffers, which become the two gradients: sigmoid -> d gate, silu -> d up
        grad_gate = torch.sigmoid(g)  # s
        grad_up = g * grad_gate  # silu = g s
        if need_gate:  # silu' = s + g s (1 - s) = s - s * silu + silu
            grad_gate.addcmul_(grad_gate, grad_up, value=-1.0).add_(grad_up).mul_(u).mul_(d)
        else:
            grad_gate = None
        grad_up = grad_up.mul_(d) if need_up else None
        if wide:
            grad_gate = None if grad_gate is None else grad_gate.to(gate.dtype)
            grad_up = None if grad_up is None else grad_up.to(up.dtype)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; through :class:`_SwiGLU` (saves two tensors, not three) for plain tensors of one shape and
    dtype under autograd, else the plain expression (tensor subclasses, ``torch.compile``, which fuses it itself)."""
    if (
        torch.is_grad_enabled()
        and (gate.requires_grad or up.requires_grad)
        and is_plain(gate)
        and is_plain(up)
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and not torch.compiler.is_compiling()
    ):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU ``down(gelu(up(x)))``.

    Under autograd the activation fed to ``down`` is not stored: the backward rebuilds it from ``gate`` and ``up`` (or
    from ``up`` for GELU), which are stored anyway (:func:`recompute_saved`), and the SwiGLU product saves only its two
    inputs (:func:`swiglu`): two ``(B, T, I)`` tensors a layer instead of four.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c, h = config.n_embd, config.intermediate_size
        self.swiglu = config.mlp == "swiglu"
        self.approximate = config.gelu_approximate
        self.up_proj = nn.Linear(c, h, bias=config.bias)
        self.gate_proj = nn.Linear(c, h, bias=config.bias) if self.swiglu else None
        self.down_proj = nn.Linear(h, c, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.gate_proj(x), self.up_proj(x)
            act = swiglu(gate, up)  # (..., I)
            rebuild = lambda: F.silu(gate).mul_(up)  # noqa: E731  the forward's values, bit for bit
        else:
            up = self.up_proj(x)
            act = F.gelu(up, approximate=self.approximate)  # (..., I)
            rebuild = lambda: F.gelu(up, approximate=self.approximate)  # noqa: E731
        with recompute_saved(act, rebuild):
            return self.down_proj(act)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm_1(x))`` then ``+ mlp(norm_2(x))``, or both from ``x`` (parallel residual)."""

    def __init__(self, config: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.parallel_residual = config.parallel_residual
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = None if (config.parallel_residual and config.shared_attention_norm) else make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The normalised inputs of attention and MLP are not stored for the backward: it renormalises the block
        input (and the mid-block residual), which the norms keep anyway (:func:`recompute_saved`). (Not quite for an
        RMSNorm that upcasts a bf16 / fp16 / fp64 input: it keeps the float32 copy, so holding the input costs what
        the dropped output saves.)"""
        h = self.norm_1(x)
        with recompute_saved(h, functools.partial(self.norm_1.forward, x)):  # x is rebound below
            a = self.drop(self.attn(h, inputs, kv_cache, self.layer_idx))
            if self.parallel_residual and self.norm_2 is None:
                return x + a + self.drop(self.mlp(h))
        if self.parallel_residual:
            h2 = self.norm_2(x)
            with recompute_saved(h2, functools.partial(self.norm_2.forward, x)):
                return x + a + self.drop(self.mlp(h2))
        x = x + a
        h2 = self.norm_2(x)
        with recompute_saved(h2, functools.partial(self.norm_2.forward, x)):
            return x + self.drop(self.mlp(h2))


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.: ``PE[p, 2i] = sin(p / 10000^(2i/C))``, ``PE[p, 2i+1] = cos(...)``; ``(..., T) -> (..., T, C)``."""
    inv = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv  # (..., T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., T, C)


class Transformer(nn.Module):
    """Decoder-only transformer.

    ``forward(input_ids)`` returns logits ``(B, T, V)``; with ``targets`` it returns the mean next-token loss instead
    (computed in chunks inside the forward, so no full float32 logits tensor exists and sharded weights are in place);
    with ``return_hidden=True`` the final normalised hidden states ``(B, T, C)``.

    Attributes:
        local_kv_heads: the key/value heads this process computes, which :meth:`new_kv_cache` allocates; ``None``
            (default) means all ``config.n_kv_head``. Tensor parallelism sets it to ``n_kv_head / t``
            (:func:`~lightning_llm.parallel.apply_tensor_parallel`: each rank's ``k_proj`` / ``v_proj`` output only
            its own contiguous slice of the heads).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.local_kv_heads: int | None = None
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.emb_norm = make_norm(config) if config.embedding_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        )
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------ parameters
    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self) -> None:
        """Initialise every weight: N(0, init_std), residual output projections scaled by 1/sqrt(2 n_layer), zero biases.

        Also used to materialise a model built on the meta device (``to_empty`` followed by this).
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, CausalSelfAttention) and module.alibi_slopes is not None:
                from lightning_llm.nn.alibi import alibi_slopes

                module.alibi_slopes = alibi_slopes(self.config.n_head).to(module.q_proj.weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------------ positions
    def attention_inputs(
        self,
        batch: int,
        t: int,
        device: torch.device,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        kv_cache: KVCache | None,
        segment_ids: torch.Tensor | None = None,
    ) -> AttentionInputs:
        cfg = self.config
        past = kv_cache.length if kv_cache is not None else 0
        s = past + t
        if kv_cache is not None and s > kv_cache.max_length:
            raise ValueError(
                f"KVCache overflow: {s} slots needed but max_length is {kv_cache.max_length}; "
                "allocate the cache with max_length >= prompt length + max_new_tokens."
            )
        if attention_mask is not None:
            if attention_mask.shape != (batch, s):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + new tokens) = {(batch, s)}, got "
                    f"{tuple(attention_mask.shape)}; pass the mask of the whole sequence seen so far."
                )
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is not None:
            q_pos = position_ids.to(device)
        elif attention_mask is not None:
            q_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        else:
            q_pos = torch.arange(past, s, device=device)[None]  # (1, T)
        if kv_cache is not None:
            kv_cache.pos[:, past:s] = q_pos
            k_pos = kv_cache.pos[:, :s]  # (B, S)
        else:
            k_pos = q_pos
        if cfg.pos_encoding == "learned" and int(q_pos.max()) >= cfg.block_size:
            raise ValueError(
                f"Position {int(q_pos.max())} is beyond the learned position table (block_size={cfg.block_size}); "
                f"shorten the input to at most {cfg.block_size} tokens or build the model with a larger block_size."
            )
        # mask None means no masking is needed beyond the plain lower triangle, which SDPA handles with is_causal=True
        # (the flash path on CUDA); a single new query after a cache sees every slot, so it needs no mask at all.
        # Eager only: under torch.compile the host read would break the graph (the mask path gives the same values).
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None
        mask, is_causal = None, past == 0
        if segment_ids is not None:  # packed rows: a query sees only keys of its own segment (example)
            if kv_cache is not None or segment_ids.shape != (batch, t):
                raise ValueError(
                    f"segment_ids must have shape (batch, seq_len) = {(batch, t)} and needs no KV cache, got "
                    f"{tuple(segment_ids.shape)}{' with a KV cache' if kv_cache is not None else ''}."
                )
            segment_ids = segment_ids.to(device)
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, S)
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            allowed = same & causal[None]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, :]
                allowed = allowed | torch.eye(t, dtype=torch.bool, device=device)[None]  # a pad query may see itself
            mask, is_causal = allowed[:, None], False  # (B, 1, T, S)
        elif attention_mask is not None or (past > 0 and t > 1):
            slots = torch.arange(s, device=device)
            q_slots = slots[past:]
            allowed = slots[None, :] <= q_slots[:, None]  # (T, S) causal
            if attention_mask is not None:
                allowed = allowed[None] & attention_mask[:, None, :]  # (B, T, S)
                allowed = allowed | (slots[None, :] == q_slots[:, None])[None]  # a pad query may see itself
            else:
                allowed = allowed[None]  # (1, T, S)
            mask, is_causal = allowed[:, None], False  # (B or 1, 1, T, S)
        cos = sin = None
        if cfg.pos_encoding == "rope":
            cos, sin = rope_cos_sin(
                q_pos, cfg.rope_dim, cfg.rope_base, cfg.rope_scaling, cfg.block_size, cfg.rope_layout
            )  # (B or 1, T, R)
        return AttentionInputs(cos=cos, sin=sin, mask=mask, q_pos=q_pos, k_pos=k_pos, is_causal=is_causal)

    # ------------------------------------------------------------------------------------------------ forward
    @torch.compiler.disable  # host-side values: runs eagerly, one graph break, the rest of forward stays traceable
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got shape {tuple(input_ids.shape)}.")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor (int64 or int32), got {input_ids.dtype}.")
        if input_ids.device.type == "cpu" and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{lo}, {hi}]; "
                    "the tokenizer and the model disagree on the vocabulary -- set model vocab_size to the tokenizer's."
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        return_hidden: bool = False,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, S)`` 1 for real tokens, 0 for padding, over past + new tokens.
            position_ids: ``(B, T)`` explicit positions (default: from the mask, else ``past .. past+T-1``).
            kv_cache: a :class:`KVCache`; new keys/values are appended and its length advanced.
            targets: ``(B, T)`` next-token ids (``-100`` = ignore): return the mean cross-entropy instead of logits.
            return_hidden: return the final normalised hidden states ``(B, T, C)``.
            segment_ids: ``(B, T)`` packed rows: the example each token belongs to; attention stays inside an
                example (block-diagonal causal mask). Pass ``position_ids`` restarting at 0 per example with it.
        """
        self._check_ids(input_ids)
        b, t = input_ids.shape
        inputs = self.attention_inputs(b, t, input_ids.device, attention_mask, position_ids, kv_cache, segment_ids)
        x = self.hidden_states(input_ids, inputs, kv_cache)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.advance(t)
        if return_hidden:
            return x
        bias = self.lm_head.bias if self.lm_head is not None else None
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(
                    f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(targets.shape)}."
                )
            return chunked_cross_entropy(
                x.flatten(0, 1), self.output_weight, targets.flatten(), bias, vocab_size=self.config.vocab_size
            )
        return self.logits(x)

    def hidden_states(
        self, input_ids: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """Embeddings, blocks and final norm: hidden states ``(B, T, C)`` of ``input_ids`` given ``inputs``.

        :meth:`forward` calls it after checking the ids and building ``inputs`` (:meth:`attention_inputs`); the static
        decoding step of :func:`~lightning_llm.nn.generation.generate` calls it with fixed-shape inputs of its own
        (no host-side checks or shape logic, so the step compiles to one graph). It does not advance ``kv_cache``.
        """
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(inputs.q_pos)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(inputs.q_pos, self.config.n_embd).to(x.dtype)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, inputs, kv_cache)
        return self.norm_f(x)  # (B, T, C)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Project final hidden states ``(..., C)`` to logits ``(..., V)`` (padded vocabulary rows dropped).

        Callers that need only some positions (the last one while decoding, target positions in LAMBADA) select them
        from ``forward(..., return_hidden=True)`` first and project just those. ``weight``: the values of
        :attr:`output_weight` in another memory layout, used instead of it (the decoder's input-major copy of a tied
        embedding, :func:`~lightning_llm.nn.generation.input_major_linear_weights`).
        """
        bias = self.lm_head.bias if self.lm_head is not None else None
        logits = F.linear(hidden, self.output_weight if weight is None else weight, bias)  # (..., V_padded)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits

    # ------------------------------------------------------------------------------------------------ decoding
    def new_kv_cache(self, batch_size: int, max_length: int, device=None, dtype=None) -> KVCache:
        p = self.wte.weight
        return KVCache(
            self.config.n_layer,
            batch_size,
            self.local_kv_heads or self.config.n_kv_head,
            max_length,
            self.config.head_dim,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )

    def generate(self, prompts, **kwargs):
        """See :func:`lightning_llm.nn.generation.generate`."""
        from lightning_llm.nn.generation import generate

        return generate(self, prompts, **kwargs)
