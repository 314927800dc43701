"""Planner: memory, communication, compute and step time of every parallel layout; a ranked recommendation.

:func:`plan` takes a :class:`~lightning_llm.config.TransformerConfig` (and, for step times, a
:class:`~lightning_llm.parallel.hardware.Hardware`); :func:`plan_command` takes what a user has at hand (a model preset
YAML, a checkpoint of ours or a Hugging Face directory), prints :func:`format_plan`'s table and returns the same
numbers as a dict (also written as JSON, and plotted, on request). :func:`positional_advice` says what RoPE needs and
what ALiBi gives at the lengths one will serve.

The model is a back-of-the-envelope one in the style of the "Scaling Book" and Megatron-LM's / DeepSpeed's guides:

* compute: ``6 N + 12 L H Q s`` FLOPs per token trained (REFERENCES.md, "Training throughput"); a forward-only pass is a
  third of it; activation checkpointing recomputes each block's forward (``+ 2 N_blk + 4 L H Q s``); time is FLOPs over
  ``peak * compute_efficiency``.
* communication: ring algorithms. Per rank, an all-reduce of ``S`` bytes over ``n`` ranks sends ``2 (n-1)/n S`` in
  ``2 (n-1)`` steps, an all-gather (``S`` = its output) or reduce-scatter (``S`` = its input) ``(n-1)/n S`` in ``n-1``
  steps, a point-to-point send ``S`` in one; a step costs ``alpha`` (latency) and the bytes cost ``1 / beta``
  (bandwidth): the alpha-beta model. A group whose ranks all sit in one node uses the intra-node link, else the
  inter-node one (ranks are placed tensor-parallel innermost, then data parallel, then pipeline: Megatron's order).
* overlap: data-parallel gradient all-reduces (DDP, last micro-batch) and FSDP all-gathers / reduce-scatters (every
  micro-batch) run behind the backward / forward compute, except the last bucket / unit; tensor-parallel all-reduces
  and pipeline sends are on the critical path.
* pipeline bubble: idle fraction ``(p-1)/(m+p-1)`` (GPipe, 1F1B), ``(p-1)/(v m+p-1)`` (interleaved, ``v`` chunks per
  rank), a third of that (zero bubble ZB-H1), as :func:`lightning_llm.parallel.pipeline.bubble_fraction`; the bubble
  adds ``f / (1 - f)`` of the busy time. Tied embeddings cannot be split into stages (``pipeline.split_model`` refuses
  them), so such models get no pipeline rows.

What the collectives move is what our code moves, checked by counting the bytes of real gloo runs
(``tests/parallel/test_comm_bytes.py``): DDP all-reduces every gradient once per optimizer step; FSDP2's
``fully_shard`` (per block + root, ``reshard_after_forward=True``) all-gathers every unit in the forward AND again in
the backward, and reduce-scatters every gradient, per micro-batch; our tensor parallelism (``ColwiseParallel`` q, k, v,
up, gate; ``RowwiseParallel`` o, down) all-reduces ``b s h`` activations twice per block forward and once per
column-parallel projection in the backward (5 with SwiGLU, 4 with GELU; Megatron's fused QKV would need 2), and
activation checkpointing recomputes one forward all-reduce per block (non-reentrant checkpointing stops recomputing
after the last saved tensor, before the MLP's all-reduce).

Notation:
    P    parameters (all, embeddings included); P_blk those inside the transformer blocks, P_rest = P - P_blk.
    N    world size (devices); d data-parallel, t tensor-parallel, p pipeline-parallel size (N = d t p); g devices per
         node.
    L    layers; h width (n_embd); a heads; s sequence length; b micro-batch size per device; V vocabulary.
    G    global batch (sequences per optimizer step); m = G / (b d) micro-batches per data-parallel rank.
    e    bytes per activation element (2 under 16-bit / mixed precision, 4 under 32-bit).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from json import dumps
from pathlib import Path
from typing import Any, Literal

from lightning_llm.config import TransformerConfig
from lightning_llm.parallel.hardware import HARDWARE, Hardware, hardware_preset

__all__ = [
    "activation_bytes",
    "format_plan",
    "model_config",
    "plan",
    "plan_command",
    "plot_plan",
    "positional_advice",
]

_PRECISIONS = {
    "32-true": (4, False),
    "32": (4, False),
    "bf16-mixed": (2, True),
    "16-mixed": (2, True),
    "bf16-true": (2, False),
    "16-true": (2, False),
}
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")
# lightning_llm.parallel.pipeline's schedule names -> the planner's (their bubble and communication model)
_SCHEDULE_ALIASES = {
    "interleaved_1f1b": "interleaved",
    "looped_bfs": "interleaved",
    "interleaved_zero_bubble": "zero_bubble",
    "zbv_zero_bubble": "zero_bubble",
}
MODULES = ("causal_lm", "dpo", "ppo", "grpo", "reward_model")
DDP_BUCKET_BYTES = 25 * 1024**2  # DistributedDataParallel(bucket_cap_mb=25)
PPO_EPOCHS = 4  # lightning_llm.modules.PPO default (TRL's num_ppo_epochs)
_GB = 1024**3


# ======================================================================================================== model sizes
def _rest_params(cfg: TransformerConfig, non_embedding: bool) -> int:
    """Parameters outside the blocks: final norm, output head (untied), embedding norm, plus tables when counted."""
    norm = cfg.n_embd * (2 if cfg.norm == "layernorm" else 1)
    rest = norm + (0 if cfg.tie_embeddings else cfg.padded_vocab_size * cfg.n_embd)
    rest += cfg.padded_vocab_size if cfg.lm_head_bias else 0
    rest += norm if cfg.embedding_norm else 0
    if not non_embedding:
        rest += cfg.padded_vocab_size * cfg.n_embd + (
            cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0
        )
    return rest


def _block_split(cfg: TransformerConfig) -> tuple[int, int]:
    """Parameters of one block that tensor parallelism shards, and those it replicates (norms, row-parallel biases).

    Sharded: the q/k/v/o and MLP weights, the column-parallel biases (q, k, v, up, gate). Replicated on every
    tensor-parallel rank: the norms and the row-parallel biases (o, down), which are added after the all-reduce.
    """
    c = cfg
    per_block = (c.num_parameters(non_embedding=True) - _rest_params(cfg, non_embedding=True)) // c.n_layer
    norm = c.n_embd * (2 if c.norm == "layernorm" else 1)
    n_norms = 1 if (c.parallel_residual and c.shared_attention_norm) else 2
    replicated = n_norms * norm + (2 * c.n_embd if c.bias else 0)
    return per_block - replicated, replicated


def _lora_params_per_block(cfg: TransformerConfig, rank: int) -> int:
    """LoRA adapter parameters of one block, ``r (in + out)`` for every projection (q, k, v, o, up, gate, down)."""
    c, q = cfg, cfg.head_dim
    shapes = [(c.n_embd, c.n_head * q), (c.n_embd, c.n_kv_head * q), (c.n_embd, c.n_kv_head * q)]
    shapes += [(c.n_head * q, c.n_embd), (c.n_embd, c.intermediate_size), (c.intermediate_size, c.n_embd)]
    if c.mlp == "swiglu":
        shapes.append((c.n_embd, c.intermediate_size))
    return sum(rank * (i + o) for i, o in shapes)


def _column_parallel_projections(cfg: TransformerConfig) -> int:
    """Column-parallel linears of a block (q, k, v, up, + gate): each all-reduces its input gradient in the backward."""
    return 5 if cfg.mlp == "swiglu" else 4


def activation_bytes(
    cfg: TransformerConfig,
    micro_batch_size: int,
    seq_len: int,
    bytes_per_element: int = 2,
    tensor_parallel_size: int = 1,
    activation_checkpointing: bool = False,
    fused_attention: bool = True,
) -> int:
    """Activation memory of one micro-batch, after Korthikanti et al. (2022), "Reducing Activation Recomputation".

    Per layer, 16-bit activations, no recomputation: ``s b h (34 + 5 a s / h)`` bytes; with t-way tensor parallelism
    (no sequence parallelism) ``s b h (10 + 24/t + 5 a s / (h t))``. The ``5 a s / h`` term is the stored attention
    matrix (scores, softmax, dropout mask): a fused kernel (SDPA flash / memory-efficient, ``fused_attention``) never
    stores it. Here the constants are scaled by ``e / 2`` for ``e``-byte activations. With per-block activation
    checkpointing a layer keeps only its input, ``e s b h``, and one layer's full activations live during recompute.
    Added: the chunked loss head (one ``min(b s, 4096) x V`` float32 logits block) and the embedding output.
    """
    layer, kept = _layer_activation_bytes(
        cfg, micro_batch_size, seq_len, bytes_per_element, tensor_parallel_size, fused_attention
    )
    layers = cfg.n_layer * kept + layer if activation_checkpointing else cfg.n_layer * layer
    return int(layers + _head_activation_bytes(cfg, micro_batch_size, seq_len, bytes_per_element))


def _layer_activation_bytes(
    cfg: TransformerConfig, b: int, s: int, e: int, t: int, fused_attention: bool
) -> tuple[float, float]:
    """(one layer's stored activations, what a checkpointed layer keeps: its input ``e s b h``)."""
    h, a = cfg.n_embd, cfg.n_head
    attn_term = 0.0 if fused_attention else 5 * a * s / (h * t)
    return s * b * h * (10 + 24 / t + attn_term) * e / 2, e * s * b * h


def _head_activation_bytes(cfg: TransformerConfig, b: int, s: int, e: int) -> float:
    return 4 * min(b * s, 4096) * cfg.padded_vocab_size + 2 * e * s * b * cfg.n_embd


# ======================================================================================================== RLHF roles
@dataclass(frozen=True)
class _Role:
    """One model a module holds: trained (``train_passes`` forward + backward passes per step) or frozen."""

    name: str
    cfg: TransformerConfig
    trainable: bool
    train_passes: int = 0  # forward + backward passes (and optimizer steps) per step
    forward_passes: int = 0  # forward-only passes per step (no grad)
    stored: bool = True  # False: shares the policy's frozen base (the LoRA reference: adapters disabled)
    scalar_head: bool = False  # reward / value: a (h -> 1) head instead of the LM head


def _roles(cfg: TransformerConfig, module: str, lora: bool) -> tuple[list[_Role], int]:
    """The models a module holds, and the sequences per example (preference pairs: 2).

    causal_lm / sft: the policy, trained. reward_model: one scalar-head model trained on pairs. dpo: the policy trained
    on pairs plus a frozen reference forward (with LoRA the reference is the base with adapters disabled: no second
    copy). ppo: policy and a separate value model, each trained ``PPO_EPOCHS`` times per rollout, plus forwards for
    generation (counted as one forward over the sequence: the FLOPs, not the memory-bandwidth-bound decoding time),
    the old log-probabilities / values, the frozen reference and the frozen reward model. grpo: the policy (one update
    per generation, TRL's default), its generation forward and the frozen reference.
    """
    policy = _Role("policy", cfg, True, train_passes=1)
    if module == "causal_lm":
        return [policy], 1
    if module == "reward_model":
        return [_Role("reward", cfg, True, train_passes=1, scalar_head=True)], 2
    if module == "dpo":
        return [policy, _Role("reference", cfg, False, forward_passes=1, stored=not lora)], 2
    if module == "ppo":
        return [
            replace(policy, train_passes=PPO_EPOCHS, forward_passes=2),
            _Role("value", cfg, True, train_passes=PPO_EPOCHS, forward_passes=1, scalar_head=True),
            _Role("reference", cfg, False, forward_passes=1, stored=not lora),
            _Role("reward", cfg, False, forward_passes=1, scalar_head=True),
        ], 1
    if module == "grpo":
        return [replace(policy, forward_passes=1), _Role("reference", cfg, False, forward_passes=1, stored=not lora)], 1
    raise ValueError(f"`module` must be one of {MODULES}, got {module!r}.")


# ======================================================================================================== layouts
@dataclass(frozen=True)
class _Layout:
    name: str
    d: int
    t: int = 1
    p: int = 1
    sharding: str = "ddp"  # ddp | shard_grad_op | full_shard | hybrid
    schedule: str | None = None
    v: int = 1  # interleaved: model chunks per pipeline rank
    shard_group: int = 1  # hybrid: ranks a parameter is sharded over (one node)


def _layouts(
    cfg: TransformerConfig,
    n: int,
    g: int,
    tensor_parallel_sizes: Sequence[int],
    pipeline_sizes: Sequence[int],
    schedules: Sequence[str],
    virtual_stages: int,
    explicit_t: int | None,
    explicit_p: int | None,
) -> list[_Layout]:
    out: list[_Layout] = []
    if explicit_t is None and explicit_p is None:
        out.append(_Layout("DDP", n))
        if n > 1:
            out.append(_Layout("FSDP SHARD_GRAD_OP", n, sharding="shard_grad_op"))
            out.append(_Layout("FSDP FULL_SHARD", n, sharding="full_shard"))
            if g < n and n % g == 0:
                out.append(_Layout(f"FSDP HYBRID_SHARD (g={g})", n, sharding="hybrid", shard_group=g))
    t_values = [explicit_t] if explicit_t is not None else [t for t in tensor_parallel_sizes if t > 1]
    p_values = [explicit_p] if explicit_p is not None else [1]
    for t in t_values:
        if t == 1 or t > n or n % t or cfg.n_head % t or cfg.n_kv_head % t or cfg.intermediate_size % t:
            continue
        for p in p_values:
            if n % (t * p) or p > cfg.n_layer:
                continue
            d = n // (t * p)
            if p == 1:
                out.append(_Layout(f"FSDP2+TP (d={d}, t={t})", d, t, sharding="full_shard"))
    pp_values = [explicit_p] if explicit_p is not None else [p for p in pipeline_sizes if p > 1]
    if cfg.tie_embeddings:  # pipeline.split_model refuses: the embedding (first stage) is the head (last stage)
        pp_values = []
    pt_values = [explicit_t] if explicit_t is not None else [1]
    for p in pp_values:
        for t in pt_values:
            if p == 1 or p > cfg.n_layer or n % (p * t) or cfg.n_head % t or cfg.n_kv_head % t:
                continue
            d = n // (p * t)
            for schedule in schedules:
                v = virtual_stages if schedule == "interleaved" else 1
                if p * v > cfg.n_layer:
                    continue
                label = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": f"interleaved v={v}", "zero_bubble": "ZB-H1"}
                tp = f", t={t}" if t > 1 else ""
                out.append(_Layout(f"PP {label[schedule]} (p={p}{tp}, d={d})", d, t, p, "ddp", schedule, v))
    return out


def _check_tensor_parallel_size(cfg: TransformerConfig, t: int) -> None:
    """Raise ``ValueError`` unless ``t`` divides the heads, key/value heads and MLP width (each rank holds 1/t)."""
    for field in ("n_head", "n_kv_head", "intermediate_size"):
        value = getattr(cfg, field)
        if value % t:
            raise ValueError(
                f"tensor_parallel_size={t} must divide TransformerConfig.{field}={value} (each rank holds "
                f"{field}/tensor_parallel_size of them); choose a tensor_parallel_size among the common divisors of "
                f"n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head} and intermediate_size={cfg.intermediate_size}."
            )


def _check_explicit(cfg: TransformerConfig, n: int, t: int | None, p: int | None) -> None:
    """Clear errors for a tensor / pipeline degree the model or the world size cannot use."""
    for name, value in (("tensor_parallel_size", t), ("pipeline_parallel_size", p)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if t is not None:
        _check_tensor_parallel_size(cfg, t)
    if p is not None and p > cfg.n_layer:
        raise ValueError(
            f"`pipeline_parallel_size`={p} is above the model's n_layer={cfg.n_layer}: every stage needs at least one "
            f"block; use at most {cfg.n_layer} stages."
        )
    if p is not None and p > 1 and cfg.tie_embeddings:
        raise ValueError(
            f"`pipeline_parallel_size`={p} needs untied embeddings: the model ties its input embedding (first stage) to "
            "its output head (last stage), which lightning_llm.parallel.pipeline cannot split; use FSDP2 / tensor "
            "parallelism, or a model with tie_embeddings=False."
        )
    model_parallel = (t or 1) * (p or 1)
    if n % model_parallel:
        raise ValueError(
            f"`world_size`={n} cannot be split into data-parallel groups of tensor_parallel_size x "
            f"pipeline_parallel_size = {t or 1} x {p or 1} = {model_parallel} devices; use a world size that is a "
            f"multiple of {model_parallel}, or other degrees."
        )


# ======================================================================================================== one row
def _link(hw: Hardware | None, span: int, g: int) -> tuple[str, float, float]:
    """(link name, bandwidth B/s, latency s) of a group whose ranks span ``span`` consecutive ranks."""
    intra = span <= g
    if hw is None:
        return ("intra" if intra else "inter"), 0.0, 0.0
    if intra:
        return "intra", hw.intra_node_gbps * 1e9, hw.intra_node_latency_us * 1e-6
    return "inter", hw.inter_node_gbps * 1e9, hw.inter_node_latency_us * 1e-6


class _Comm:
    """Accumulates collectives per kind: payload S, ring bytes sent per rank, calls, and alpha-beta time."""

    FACTORS = {"all_reduce": (2, 2), "all_gather": (1, 1), "reduce_scatter": (1, 1), "send_recv": (0, 0)}

    def __init__(self, hw: Hardware | None) -> None:
        self.hw = hw
        self.kinds: dict[str, dict[str, Any]] = {}
        self.overlappable_s = 0.0
        self.exposed_s = 0.0
        self.tail_s = 0.0

    def add(
        self,
        kind: str,
        payload: float,
        calls: int,
        group: int,
        span: int,
        g: int,
        overlappable: bool,
        what: str,
    ) -> None:
        if payload <= 0 or calls <= 0 or (group <= 1 and kind != "send_recv"):
            return
        link, bw, alpha = _link(self.hw, span, g)
        byte_factor, step_factor = self.FACTORS[kind]
        if kind == "send_recv":
            wire, steps = payload, calls
        else:
            wire = byte_factor * (group - 1) / group * payload
            steps = step_factor * (group - 1) * calls
        seconds = steps * alpha + (wire / bw if bw else 0.0)
        entry = self.kinds.setdefault(
            kind, {"payload_bytes": 0, "wire_bytes": 0, "calls": 0, "time_s": 0.0, "groups": []}
        )
        entry["payload_bytes"] += int(payload)
        entry["wire_bytes"] += int(wire)
        entry["calls"] += int(calls)
        entry["time_s"] += seconds
        entry["groups"].append({"what": what, "group_size": group, "link": link, "bytes": int(wire)})
        if overlappable:
            self.overlappable_s += seconds
            self.tail_s = max(self.tail_s, seconds / calls)
        else:
            self.exposed_s += seconds


def _row(
    cfg: TransformerConfig,
    layout: _Layout,
    roles: list[_Role],
    *,
    n: int,
    g: int,
    precision: str,
    b: int,
    s: int,
    global_batch: int,
    ac: bool,
    lora_rank: int | None,
    fused_attention: bool,
    hw: Hardware | None,
    memory_gib: float | None,
) -> dict[str, Any]:
    e, mixed = _PRECISIONS[precision]
    d, t, p = layout.d, layout.t, layout.p
    # bytes per parameter: working copy, gradient, AdamW (2 states); under *-mixed the fp32 parameters are the master
    # weights (autocast / FSDP make 16-bit copies per op / per gather), under *-true everything is in the parameter dtype
    w = 4 if mixed else e
    res = 4 if mixed else e  # residual stream / gradients arriving at block boundaries (fp32 under autocast)
    m = global_batch // (b * d)  # micro-batches per data-parallel rank and optimizer step
    sharded, replicated = _block_split(cfg)
    layers = math.ceil(cfg.n_layer / p)  # blocks on the busiest stage
    blk_local = layers * (sharded / t + replicated)  # one stage's block parameters on one tensor-parallel rank
    emb = cfg.padded_vocab_size * cfg.n_embd + (cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0)
    norm = cfg.n_embd * (2 if cfg.norm == "layernorm" else 1)
    head_rest = _rest_params(cfg, non_embedding=True)  # final norm, untied head, lm-head bias, embedding norm

    # a reward / value backbone keeps its untied lm_head (and its bias) in the state dict, frozen: it scores through
    # the scalar head and never projects to the vocabulary (modules.reward_model.freeze_lm_head)
    frozen_head = 0 if cfg.tie_embeddings else cfg.padded_vocab_size * (cfg.n_embd + (1 if cfg.lm_head_bias else 0))

    def stage_params(role: _Role) -> tuple[float, float]:
        """(parameters on the busiest stage, of which trainable), per tensor-parallel rank."""
        rest_head = head_rest + cfg.n_embd + 1 if role.scalar_head else head_rest  # + the (h -> 1) head with bias
        rest = emb + rest_head if p == 1 else max(emb, rest_head + (emb if cfg.tie_embeddings else 0))
        total = blk_local + rest
        if not role.trainable:
            return total, 0.0
        if lora_rank:
            adapters = layers * _lora_params_per_block(cfg, lora_rank) / t
            return total + adapters, adapters
        return total, total - (frozen_head if role.scalar_head else 0)

    # ---------------------------------------------------------------------------------------------- memory
    shard = {"ddp": 1, "shard_grad_op": d, "full_shard": d, "hybrid": layout.shard_group}[layout.sharding]
    params = grads = optim = gathered = act = 0.0
    per_layer, kept = _layer_activation_bytes(cfg, b, s, e, t, fused_attention)
    for role in roles:
        total, trainable = stage_params(role)
        if not role.stored:
            continue
        if layout.sharding == "ddp":
            params += w * total
        elif layout.sharding == "shard_grad_op":  # ZeRO-2: parameters stay gathered from forward to backward
            params += w * total / shard + (e * total if mixed else (w * total * (shard - 1) / shard))
        else:
            params += w * total / shard
        grads += w * trainable / shard
        optim += 2 * w * trainable / shard
        if layout.sharding in ("full_shard", "hybrid") and shard > 1:
            gathered = max(gathered, 2 * e * (sharded / t + replicated))  # current + prefetched block
        if role.trainable:  # frozen models run without grad: no stored activations
            rcfg = replace(cfg, vocab_size=1, padded_vocab_size=1) if role.scalar_head else cfg
            head_act = _head_activation_bytes(rcfg, b, s, e)
            if p == 1:
                act += activation_bytes(rcfg, b, s, e, t, ac, fused_attention)
            else:  # micro-batches whose activations a stage holds at once
                inflight = {
                    "gpipe": m,
                    "1f1b": min(p, m),
                    "zero_bubble": min(p, m),
                    "interleaved": min(p, m) * (1 + (p - 1) / (p * layout.v)),
                }[layout.schedule]
                stage = layers * kept + per_layer if ac else layers * per_layer
                act += inflight * stage + head_act
    total_bytes = params + gathered + grads + optim + act
    fits = None if memory_gib is None else bool(total_bytes <= 0.9 * memory_gib * _GB)

    # ---------------------------------------------------------------------------------------------- communication
    comm = _Comm(hw)
    units = layers + 1  # FSDP: one unit per block + the root
    dp_span, tp_span, pp_span = t * d, t, n
    for role in roles:
        total, trainable = stage_params(role)
        passes = role.train_passes
        fwd = role.forward_passes
        if d > 1 and layout.sharding == "ddp" and passes:
            grad_bytes = w * trainable
            calls = passes * max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES))
            comm.add("all_reduce", passes * grad_bytes, calls, d, dp_span, g, True, f"{role.name} gradients (DDP)")
        elif d > 1 and layout.sharding != "ddp":
            group, span = (shard, t * shard) if layout.sharding == "hybrid" else (d, dp_span)
            gathers = 1 if layout.sharding == "shard_grad_op" else 2  # ZeRO-3 gathers again for the backward
            ag = m * (passes * gathers + fwd) * w * total
            ag_calls = m * (passes * gathers + fwd) * units
            comm.add("all_gather", ag, ag_calls, group, span, g, True, f"{role.name} parameters (FSDP)")
            comm.add(
                "reduce_scatter",
                m * passes * w * trainable,
                m * passes * units,
                group,
                span,
                g,
                True,
                f"{role.name} gradients (FSDP)",
            )
            if layout.sharding == "hybrid":
                replicas = d // shard
                comm.add(
                    "all_reduce",
                    m * passes * w * trainable / shard,
                    m * passes * units,
                    replicas,
                    n,
                    g,
                    True,
                    f"{role.name} gradient shards across nodes (HSDP)",
                )
        if t > 1:
            act_elems = b * s * cfg.n_embd
            fwd_calls = m * (passes + fwd) * layers * 2 + (m * passes * layers if ac else 0)
            bwd_calls = m * passes * layers * _column_parallel_projections(cfg)
            comm.add(
                "all_reduce",
                fwd_calls * act_elems * e,
                fwd_calls,
                t,
                tp_span,
                g,
                False,
                f"{role.name} row-parallel outputs (TP forward)",
            )
            comm.add(
                "all_reduce",
                bwd_calls * act_elems * res,
                bwd_calls,
                t,
                tp_span,
                g,
                False,
                f"{role.name} column-parallel input gradients (TP backward)",
            )
        if p > 1:
            # the busiest rank: an interior stage sends an activation forward and a gradient back per micro-batch and
            # chunk; with p = 2 every rank holds an end of the pipeline (its first / last chunk sends one way only)
            sends = m * (passes * (2 * layout.v - (1 if p == 2 else 0)) + fwd * layout.v)
            comm.add(
                "send_recv",
                sends * b * s * cfg.n_embd * res,
                sends,
                2,
                pp_span,
                g,
                False,
                f"{role.name} stage boundaries (PP)",
            )

    out: dict[str, Any] = {
        "strategy": layout.name,
        "activation_checkpointing": ac,
        "data_parallel_size": d,
        "tensor_parallel_size": t,
        "pipeline_parallel_size": p,
        "sharding": layout.sharding,
        "schedule": layout.schedule,
        "micro_batches": m,
        "params_bytes": int(params + gathered),
        "grads_bytes": int(grads),
        "optimizer_bytes": int(optim),
        "activations_bytes": int(act),
        "total_bytes": int(total_bytes),
        "sharded_params_bytes": int(params),  # persistent parameter storage (no transient gathers)
        "gathered_bytes": int(gathered),
        "params_gb": round((params + gathered) / _GB, 3),
        "grads_gb": round(grads / _GB, 3),
        "optimizer_gb": round(optim / _GB, 3),
        "activations_gb": round(act / _GB, 3),
        "total_gb": round(total_bytes / _GB, 3),
        "fits": fits,
        "comm": {k: {kk: vv for kk, vv in v.items()} for k, v in comm.kinds.items()},
        "comm_bytes": sum(v["wire_bytes"] for v in comm.kinds.values()),
    }

    # ---------------------------------------------------------------------------------------------- time
    if hw is not None:
        hq = cfg.n_head * cfg.head_dim
        flops = 0.0
        for role in roles:
            # everything after the blocks: final norm, output projection (tied or not), biases; a scalar head: h + 1
            tied = cfg.padded_vocab_size * cfg.n_embd if cfg.tie_embeddings else 0
            head_params = norm + cfg.n_embd + 1 if role.scalar_head else head_rest + tied
            matmul = sharded + replicated  # one block (norms included: 6 N counts every parameter)
            attn = 12 * hq * s  # per layer and token, forward + backward
            lora = _lora_params_per_block(cfg, lora_rank) if (lora_rank and role.trainable) else 0
            weight_grads = 6 if (role.trainable and not lora_rank) else 4  # frozen weights: no weight gradients
            train_blk = weight_grads * matmul + 6 * lora + attn + ((2 * matmul + 2 * lora + attn / 3) if ac else 0)
            fwd_blk = 2 * matmul + 2 * lora + attn / 3
            head_train = (6 if (role.trainable and not lora_rank) else 4) * head_params
            tokens = m * b * s  # per data-parallel rank (all of its tensor / pipeline ranks)
            blk = layers / t * (role.train_passes * train_blk + role.forward_passes * fwd_blk)
            head = role.train_passes * head_train + role.forward_passes * 2 * head_params
            flops += tokens * (blk + head)  # the busiest stage (the last: blocks + head, the head replicated in TP)
        compute = flops / hw.peak_flops(precision) / hw.compute_efficiency
        # idle fraction f (as lightning_llm.parallel.pipeline.bubble_fraction): GPipe / 1F1B (p-1)/(m+p-1),
        # interleaved (p-1)/(v m+p-1), ZB-H1 a third of that; the bubble is f / (1 - f) of the busy time
        if p > 1:
            v = layout.v
            f = (p - 1) / (v * m + p - 1) / (3 if layout.schedule == "zero_bubble" else 1)
            bubble = f / (1 - f) * compute
        else:
            bubble = 0.0
        # DDP all-reduces only during the last micro-batch's backward; FSDP's gathers / scatters hide behind every
        # micro-batch's compute; one bucket / unit (the last) always shows
        ddp_only = layout.sharding == "ddp"
        window = (compute / m) * (2 / 3) if ddp_only else compute
        exposed_overlap = min(comm.overlappable_s, max(comm.overlappable_s - window, 0.0) + comm.tail_s)
        exposed = comm.exposed_s + exposed_overlap
        step = compute + bubble + exposed
        tokens_step = global_batch * s
        out.update(
            {
                "compute_s": compute,
                "comm_s": comm.exposed_s + comm.overlappable_s,
                "exposed_comm_s": exposed,
                "overlapped_comm_s": comm.overlappable_s - exposed_overlap,
                "bubble_s": bubble,
                "bubble_fraction": bubble / (compute + bubble) if p > 1 else 0.0,
                "step_s": step,
                "tokens_per_s": tokens_step / step,
                "flops_utilization": flops / (step * hw.peak_flops(precision)),
                "flops_per_device": flops,
            }
        )
        parts = {"compute": compute, "communication": exposed, "pipeline bubble": bubble}
        out["binding"] = "memory" if fits is False else max(parts, key=parts.get)
    return out


# ======================================================================================================== plan
def _positive(name: str, value: Any, kind: type = int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
    if not ok:
        what = "a number > 0" if kind is float else "a positive int"
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def plan(
    config: TransformerConfig | dict[str, Any],
    world_size: int,
    precision: str = "bf16-mixed",
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    device_memory_gib: float | None = None,
    activation_checkpointing: bool | None = None,
    devices_per_node: int | None = None,
    tensor_parallel_sizes: Sequence[int] = (2, 4, 8),
    fused_attention: bool = True,
    *,
    global_batch_size: int | None = None,
    hardware: str | Hardware | None = None,
    pipeline_sizes: Sequence[int] = (2, 4),
    pipeline_schedules: Sequence[str] = SCHEDULES,
    virtual_stages: int = 2,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    module: str = "causal_lm",
    lora_rank: int | None = None,
    **hardware_overrides: Any,
) -> dict[str, Any]:
    """Memory, collective bytes, compute / communication / bubble time and throughput of every layout; a recommendation.

    Model states per device (bytes; AdamW keeps 2 states in the parameter dtype; mixed precision keeps fp32 parameters
    that double as master weights, 16-bit copies are made per op (autocast) or per gather (FSDP)):

    ============== =========================== ============================== ============================
    strategy        parameters                  gradients                      optimizer
    ============== =========================== ============================== ============================
    DDP             w P                         w P                            2 w P
    SHARD_GRAD_OP   w P / N (+ e P gathered)    w P / N                        2 w P / N
    FULL_SHARD      w P / N (+ 2 gathered blk)  w P / N                        2 w P / N
    HYBRID_SHARD    as FULL_SHARD with N = g ranks per node
    FSDP2+TP        (L (P_shd / t + P_rep) + P_rest) / d, P_shd the block weights TP splits, P_rep norms / row biases
    PP              the busiest stage's ``ceil(L/p)`` blocks + embedding or head, replicated over d (DDP)
    ============== =========================== ============================== ============================

    ``w`` is 4 bytes under 32-bit and ``*-mixed``, 2 under ``*-true`` 16-bit. Activations: :func:`activation_bytes`;
    a pipeline stage holds ``m`` (GPipe), ``min(p, m)`` (1F1B, ZB-H1) or ``min(p, m) (1 + (p-1)/(p v))``
    (interleaved) micro-batches of its layers' activations. Frozen models (the reference, a reward model) hold ``w``
    bytes per parameter and no gradients, optimizer states or activations; LoRA trains only ``r (in + out)`` adapters
    per projection, the base is frozen. The collectives, compute and timing model: see the module docstring.

    Args:
        config: a :class:`TransformerConfig` or its dict.
        world_size: N.
        precision: Lightning precision string (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``).
        micro_batch_size: b sequences per device (per data-parallel rank) and forward pass.
        seq_len: s (default ``config.block_size``).
        device_memory_gib: memory per device in GiB (default: the hardware's); a row fits with 10% headroom.
        activation_checkpointing: evaluate only this setting (``None``: both).
        devices_per_node: g (default: the hardware's, else ``min(N, 8)``).
        tensor_parallel_sizes: the t values swept for FSDP2 + TP (those that divide N and the heads).
        fused_attention: the attention kernel never stores the ``(s, s)`` matrix (SDPA flash / memory-efficient).
        global_batch_size: G examples per optimizer step (default ``micro_batch_size * world_size``: one micro-batch
            per device under DDP; layouts with fewer data-parallel ranks accumulate ``G / (b d)`` micro-batches).
        hardware: a preset name (:data:`~lightning_llm.parallel.hardware.HARDWARE`) or a
            :class:`~lightning_llm.parallel.hardware.Hardware`; without it (and without overrides) no times are
            estimated and the recommendation is the first fitting row in ascending-communication order.
        pipeline_sizes: the p values swept for pipeline layouts (those <= L that divide N).
        pipeline_schedules: among ``gpipe``, ``1f1b``, ``interleaved``, ``zero_bubble`` (or
            :mod:`~lightning_llm.parallel.pipeline`'s names: ``interleaved_1f1b``, ``looped_bfs``,
            ``interleaved_zero_bubble``, ``zbv_zero_bubble``).
        virtual_stages: v, model chunks per pipeline rank of the interleaved schedule.
        tensor_parallel_size: plan only layouts with exactly this t (an error when it cannot be used).
        pipeline_parallel_size: plan only pipeline layouts with exactly this p (an error when it cannot be used).
        module: ``causal_lm`` (also SFT), ``dpo``, ``ppo``, ``grpo`` or ``reward_model``: which models are held and
            trained (see ``_roles``).
        lora_rank: train LoRA adapters of this rank on every block projection instead of all weights.
        **hardware_overrides: :class:`Hardware` fields overriding the preset (``peak_tflops``, ``intra_node_gbps``,
            ``inter_node_gbps``, ``intra_node_latency_us``, ``inter_node_latency_us``, ``compute_efficiency``, ...).

    Returns:
        ``{"rows": [...], "ranking": [...], "recommendation": dict | None, "reason": str, "notes": str,
        "parameters": P, "block_parameters": P_blk, "hardware": dict | None, ...}``. Every row has the memory keys
        (``params_gb`` ... ``total_gb``, ``fits``, ``*_bytes``), ``comm`` (per collective kind: ``payload_bytes`` S,
        ``wire_bytes`` sent per rank, ``calls``, ``time_s``, the groups), and with hardware ``compute_s``,
        ``comm_s``, ``exposed_comm_s``, ``overlapped_comm_s``, ``bubble_s``, ``bubble_fraction``, ``step_s``,
        ``tokens_per_s`` and ``binding`` (the largest of compute, exposed communication and bubble).

    Raises:
        ValueError: for a world size, tensor-parallel degree or pipeline degree the model cannot use, a global batch
            that does not split into micro-batches, a zero memory or bandwidth, an unknown module or precision.
    """
    cfg = config if isinstance(config, TransformerConfig) else TransformerConfig.from_dict(dict(config))
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}.")
    if precision not in _PRECISIONS:
        raise ValueError(f"`precision` must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
    _positive("micro_batch_size", micro_batch_size, allow_none=False)
    _positive("seq_len", seq_len)
    _positive("device_memory_gib", device_memory_gib, float)
    _positive("devices_per_node", devices_per_node)
    _positive("global_batch_size", global_batch_size)
    _positive("lora_rank", lora_rank)
    _positive("virtual_stages", virtual_stages)
    if module not in MODULES:
        raise ValueError(f"`module` must be one of {MODULES}, got {module!r}.")
    pipeline_schedules = list(dict.fromkeys(_SCHEDULE_ALIASES.get(x, x) for x in pipeline_schedules))
    bad = sorted(set(pipeline_schedules) - set(SCHEDULES))
    if bad:
        raise ValueError(f"`pipeline_schedules` must be among {SCHEDULES}, got {bad}.")
    _check_explicit(cfg, world_size, tensor_parallel_size, pipeline_parallel_size)
    hw = hardware_preset(hardware, **hardware_overrides) if (hardware is not None or hardware_overrides) else None
    n = world_size
    s = seq_len or cfg.block_size
    b = micro_batch_size
    g = devices_per_node or (hw.devices_per_node if hw is not None else min(n, 8))
    memory = device_memory_gib if device_memory_gib is not None else (hw.memory_gib if hw is not None else None)
    roles, per_example = _roles(cfg, module, bool(lora_rank))
    examples = global_batch_size or b * n
    sequences = examples * per_example
    checkpoint_choices = [False, True] if activation_checkpointing is None else [bool(activation_checkpointing)]
    layouts = _layouts(
        cfg,
        n,
        g,
        tensor_parallel_sizes,
        pipeline_sizes,
        pipeline_schedules,
        virtual_stages,
        tensor_parallel_size,
        pipeline_parallel_size,
    )
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for layout in layouts:
        if sequences % (b * layout.d):
            skipped.append(f"{layout.name}: {sequences} sequences do not split into micro-batches of {b} x {layout.d}")
            continue
        for ac in checkpoint_choices:
            rows.append(
                _row(
                    cfg,
                    layout,
                    roles,
                    n=n,
                    g=g,
                    precision=precision,
                    b=b,
                    s=s,
                    global_batch=sequences,
                    ac=ac,
                    lora_rank=lora_rank,
                    fused_attention=fused_attention,
                    hw=hw,
                    memory_gib=memory,
                )
            )
    if not rows:
        raise ValueError(
            f"No layout can use world_size={n} with global_batch_size={examples} ({sequences} sequences) and "
            f"micro_batch_size={b}: " + "; ".join(skipped) + ". Make the global batch a multiple of "
            "micro_batch_size x data-parallel size."
        )
    ranking, recommendation, reason = _rank(rows, memory, hw)
    p_total = cfg.num_parameters(non_embedding=False)
    p_blk = p_total - _rest_params(cfg, non_embedding=False)
    notes = (
        f"P={p_total:,} parameters ({p_blk:,} in blocks), precision={precision}, b={b}, s={s}, N={n}, "
        f"G={examples} {'pairs' if per_example == 2 else 'sequences'}, module={module}"
        + (f", LoRA r={lora_rank}" if lora_rank else "")
        + ". Activations after Korthikanti et al. 2022 (fused attention drops the 5as/h term)."
    )
    if hw is not None:
        notes += (
            f" Hardware {hw.name}: {hw.peak_flops(precision) / 1e12:g} TFLOP/s x {hw.compute_efficiency:g}, "
            f"{hw.intra_node_gbps:g} GB/s intra / {hw.inter_node_gbps:g} GB/s inter-node, g={g}."
        )
    return {
        "rows": rows,
        "ranking": ranking,
        "recommendation": recommendation,
        "reason": reason,
        "notes": notes,
        "skipped": skipped,
        "parameters": p_total,
        "block_parameters": p_blk,
        "module": module,
        "models": [
            {
                "name": r.name,
                "trainable": r.trainable,
                "train_passes": r.train_passes,
                "forward_passes": r.forward_passes,
                "stored": r.stored,
            }
            for r in roles
        ],
        "lora_rank": lora_rank,
        "global_batch_size": examples,
        "sequences_per_step": sequences,
        "seq_len": s,
        "world_size": n,
        "devices_per_node": g,
        "device_memory_gib": memory,
        "hardware": hw.to_dict() if hw is not None else None,
    }


def _label(row: dict[str, Any]) -> str:
    return f"{row['strategy']} ({'with' if row['activation_checkpointing'] else 'without'} act. ckpt)"


def _rank(
    rows: list[dict[str, Any]], memory: float | None, hw: Hardware | None
) -> tuple[list[str], dict[str, Any] | None, str]:
    """Fitting rows by step time (with hardware) or in the table's ascending-communication order (without)."""
    candidates = [r for r in rows if r["fits"] is not False]
    if hw is None:
        if memory is None:
            return [], None, "no device memory or hardware given: nothing to rank"
        rec = next((r for r in rows if r["fits"]), None)
        ranking = [_label(r) for r in candidates]
        if rec is None:
            return ranking, None, "nothing fits; lower micro_batch_size / seq_len or add devices"
        return (
            ranking,
            rec,
            (
                f"the first layout that fits in {memory:g} GiB in ascending-communication order (pass --hardware for step "
                "times)"
            ),
        )
    ordered = sorted(candidates, key=lambda r: (r["step_s"], r["total_bytes"]))
    # within 2% of the fastest (the model's resolution), prefer the layout that moves the fewest bytes, then memory
    if ordered:
        near = [r for r in ordered if r["step_s"] <= 1.02 * ordered[0]["step_s"]]
        near.sort(key=lambda r: (r["comm_bytes"], r["total_bytes"]))
        ordered = near + [r for r in ordered if r not in near]
    ranking = [_label(r) for r in ordered]
    if not ordered:
        smallest = min(rows, key=lambda r: r["total_bytes"])
        return (
            ranking,
            None,
            (
                f"nothing fits in {memory:g} GiB (the smallest, {_label(smallest)}, needs {smallest['total_gb']:.1f} "
                "GiB): lower micro_batch_size / seq_len, use LoRA, or add devices"
            ),
        )
    rec = ordered[0]
    parts = {"compute": rec["compute_s"], "exposed communication": rec["exposed_comm_s"], "bubble": rec["bubble_s"]}
    kinds = rec["comm"]
    biggest = max(kinds, key=lambda k: kinds[k]["time_s"]) if kinds else None
    fastest = min(r["step_s"] for r in ordered)
    lead = "fastest layout that fits" if rec["step_s"] == fastest else "within 2% of the fastest, fewest bytes moved"
    reason = (
        f"{lead}: {rec['step_s'] * 1e3:.1f} ms per step, {rec['tokens_per_s']:,.0f} tokens/s; "
        f"the step is {rec['binding']}-bound (compute {parts['compute'] * 1e3:.1f} ms, exposed communication "
        f"{parts['exposed communication'] * 1e3:.1f} ms"
        + (f" of {rec['comm_s'] * 1e3:.1f} ms, mostly {biggest}" if biggest else "")
        + (f", bubble {parts['bubble'] * 1e3:.1f} ms" if rec["bubble_s"] else "")
        + ")"
    )
    if len(ordered) > 1:
        second = ordered[1]
        reason += f"; next: {_label(second)} at {second['step_s'] * 1e3:.1f} ms ({second['binding']}-bound)"
    too_big = [r for r in rows if r["fits"] is False and r["step_s"] < rec["step_s"]]
    if too_big:
        faster = min(too_big, key=lambda r: r["step_s"])
        reason += (
            f"; {_label(faster)} would be faster ({faster['step_s'] * 1e3:.1f} ms) but needs "
            f"{faster['total_gb']:.1f} GiB of {memory:g} (memory binds)"
        )
    return ranking, rec, reason


# ======================================================================================================== positions
# The project's measurement (README.md, "Train short, test long": benchmarks/extrapolation.py running
# notebooks/rope_vs_alibi_extrapolation.py, saved in benchmarks/results/extrapolation_cpu.json at commit 7872ec4): 2
# layers x 128, BPE 2048, trained 600 steps at length 64, perplexity at 1x, 2x, 4x, 8x the training length.
EXTRAPOLATION_PPL: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "embedded": {"rope": (68.38, 69.22, 73.86, 80.62), "alibi": (68.80, 67.57, 66.93, 66.76)},
    "Tiny Shakespeare": {"rope": (92.42, 94.17, 103.11, 115.97), "alibi": (93.64, 92.98, 92.96, 92.90)},
}
EXTRAPOLATION_RATIOS = (1, 2, 4, 8)


def _measured(encoding: str, ratio: float) -> str:
    """The project's measured perplexity change at the nearest measured ratio (<= 8x), both data sets."""
    k = min(range(len(EXTRAPOLATION_RATIOS)), key=lambda i: abs(math.log(EXTRAPOLATION_RATIOS[i] / ratio)))
    changes = [
        f"{data} {ppl[encoding][0]:.2f} -> {ppl[encoding][k]:.2f} ({100 * (ppl[encoding][k] / ppl[encoding][0] - 1):+.1f}%)"
        for data, ppl in EXTRAPOLATION_PPL.items()
    ]
    return f"at {EXTRAPOLATION_RATIOS[k]}x the training length: " + ", ".join(changes)


def positional_advice(train_len: int, serve_lengths: Sequence[int] | int, pos_encoding: str = "rope") -> dict[str, Any]:
    """What RoPE needs and what ALiBi gives when serving at ``serve_lengths`` a model trained at ``train_len``.

    RoPE: with a factor ``f = max(serve) / train_len <= 1`` nothing; otherwise a ``rope_scaling`` with that factor and
    ``original_max_position_embeddings = train_len``: YaRN (attention factor ``0.1 ln f + 1``; the best quality after a
    short fine-tune), dynamic NTK (no fine-tuning, recomputed as the sequence grows), linear position interpolation
    (needs fine-tuning: LLaMA-7B reached 32k within 1000 steps), or Llama-3.1's scheme at factor 8. ALiBi needs
    nothing: the ALiBi paper and this project's measurement show its perplexity holding or falling past the training
    length (at the cost of an attention bias: 113 vs 287 TFLOP/s on an H200 through SDPA, 178 through FlexAttention).

    Returns:
        ``{"factor": f, "rope": {...: the rope_scaling to set, text}, "alibi": text, "measured": {...},
        "recommendation": text}``.
    """
    _positive("train_len", train_len, allow_none=False)
    lengths = [serve_lengths] if isinstance(serve_lengths, int) else list(serve_lengths)
    if not lengths:
        raise ValueError("`serve_lengths` must name at least one length to serve, got none.")
    for value in lengths:
        _positive("serve_lengths", value, allow_none=False)
    longest = max(lengths)
    factor = longest / train_len
    measured = {
        "source": "README.md 'Train short, test long' (notebooks/rope_vs_alibi_extrapolation.py)",
        "rope": _measured("rope", max(factor, 1.0)),
        "alibi": _measured("alibi", max(factor, 1.0)),
    }
    if factor <= 1:
        rope = {
            "rope_scaling": None,
            "text": f"no scaling: every serving length is within the training length {train_len}",
        }
        alibi = "nothing to do either: every serving length is within the training length"
        rec = "keep the current encoding; no length extrapolation is needed"
    else:
        f = float(math.ceil(factor * 100) / 100)
        yarn = {"type": "yarn", "factor": f, "original_max_position_embeddings": train_len}
        rope = {
            "rope_scaling": yarn,
            "alternatives": [
                {"type": "dynamic", "factor": f, "original_max_position_embeddings": train_len},
                {"type": "linear", "factor": f},
            ]
            + (
                [
                    {
                        "type": "llama3",
                        "factor": 8.0,
                        "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": train_len,
                    }
                ]
                if f <= 8
                else []
            ),
            "text": (
                f"serving {longest} tokens is {factor:.2f}x the training length {train_len}: set rope_scaling={yarn} "
                f"(attention factor 0.1 ln {f:g} + 1 = {0.1 * math.log(f) + 1:.3f}) and fine-tune briefly on long "
                "sequences; 'dynamic' (NTK, base grows with the length) works without fine-tuning, 'linear' position "
                "interpolation needs it (LLaMA-7B: 32k within 1000 steps). Unscaled RoPE degrades: measured "
                + measured["rope"]
                + "; ALiBi paper, trained at 512: rotary 20.07 -> 21.37 / 35.54 / 79.25 at 1012 / 3512 / 15512."
            ),
        }
        alibi = (
            f"ALiBi extrapolates without any change: measured {measured['alibi']}; ALiBi paper (trained at 512): "
            "19.73 -> 18.73 / 18.40 / 18.31 at 1012 / 3512 / 15512. Cost: the bias rules out the flash kernel (H200: "
            "113 TFLOP/s through SDPA with a float bias, 178 through compiled FlexAttention, vs 287 without)."
        )
        rec = (
            f"training a new model to serve {factor:.1f}x its training length: ALiBi (no scaling, perplexity held "
            "or fell in our measurement); keeping RoPE (or a pretrained RoPE model): YaRN at factor "
            f"{f:g} with a short long-sequence fine-tune"
        )
    current = {
        "rope": rope["text"],
        "alibi": alibi,
    }.get(
        pos_encoding,
        f"{pos_encoding!r} positions do not extrapolate (learned positions have no table entry past block_size; "
        "measured: learned 149.23 -> 214.98 at 8x on the embedded corpus): retrain or fine-tune with RoPE + scaling "
        "or ALiBi, as below",
    )
    return {
        "train_len": train_len,
        "serve_lengths": lengths,
        "factor": factor,
        "pos_encoding": pos_encoding,
        "rope": rope,
        "alibi": alibi,
        "current": current,
        "measured": measured,
        "recommendation": rec,
    }


# ======================================================================================================== output
def _family(row: dict[str, Any]) -> str:
    """The layout without its world-size-dependent degrees (a line of the plot)."""
    name = row["strategy"]
    if row["pipeline_parallel_size"] > 1:
        label = name.split(" (")[0]
        tp = f", t={row['tensor_parallel_size']}" if row["tensor_parallel_size"] > 1 else ""
        return f"{label} (p={row['pipeline_parallel_size']}{tp})"
    if row["tensor_parallel_size"] > 1:
        return f"FSDP2+TP (t={row['tensor_parallel_size']})"
    return name.split(" (")[0]


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a fixed-width table: GiB per device, MB each collective sends per device and step, and (with
    hardware) milliseconds of compute, exposed communication and bubble, the step time and tokens/s; then the
    recommendation and why."""
    timed = result.get("hardware") is not None
    head = f"{'strategy':<32} {'ckpt':>4} {'total GiB':>9} {'fits':>4} {'AR MB':>8} {'AG MB':>8} {'RS MB':>8} {'P2P MB':>8}"
    if timed:
        head += (
            f" {'compute ms':>10} {'comm ms':>8} {'exposed':>8} {'bubble':>7} {'step ms':>8} {'tokens/s':>10} bound by"
        )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        fits = "" if r["fits"] is None else ("yes" if r["fits"] else "no")
        ckpt = "yes" if r["activation_checkpointing"] else "no"
        mb = [r["comm"].get(k, {}).get("wire_bytes", 0) / 1e6 for k in ("all_reduce", "all_gather", "reduce_scatter")]
        mb.append(r["comm"].get("send_recv", {}).get("wire_bytes", 0) / 1e6)
        line = f"{r['strategy']:<32} {ckpt:>4} {r['total_gb']:>9.3f} {fits:>4} " + " ".join(f"{x:>8.1f}" for x in mb)
        if timed:
            line += (
                f" {r['compute_s'] * 1e3:>10.2f} {r['comm_s'] * 1e3:>8.2f} {r['exposed_comm_s'] * 1e3:>8.2f}"
                f" {r['bubble_s'] * 1e3:>7.2f} {r['step_s'] * 1e3:>8.2f} {r['tokens_per_s']:>10,.0f} {r['binding']}"
            )
        lines.append(line)
    lines.append(result["notes"])
    if result.get("skipped"):
        lines.append("skipped: " + "; ".join(result["skipped"]))
    rec = result.get("recommendation")
    if rec is not None:
        ckpt = "on" if rec["activation_checkpointing"] else "off"
        lines.append(f"recommended: {rec['strategy']}, activation checkpointing {ckpt} ({result['reason']})")
    elif any(r["fits"] is not None for r in result["rows"]):
        lines.append(f"recommended: nothing fits; {result['reason']}")
    advice = result.get("positional_advice")
    if advice is not None:
        lines.append(
            f"positions ({advice['pos_encoding']}, trained at {advice['train_len']}, serving up to "
            f"{max(advice['serve_lengths'])}): {advice['current']}"
        )
        lines.append(f"  RoPE: {advice['rope']['text']}")
        lines.append(f"  ALiBi: {advice['alibi']}")
        lines.append(f"  advice: {advice['recommendation']}")
    return "\n".join(lines)


def plot_plan(
    config: TransformerConfig,
    path: str | os.PathLike,
    world_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    activation_checkpointing: bool | None = False,
    **plan_kwargs: Any,
) -> dict[str, list[tuple[int, float]]]:
    """Plot step time per layout against world size (weak scaling: ``micro_batch_size`` per device) and save it.

    Each line is a layout family (DDP, FSDP FULL_SHARD, FSDP2+TP (t=2), PP 1F1B (p=2), ...); a point is drawn only
    where the layout fits in memory (open markers where it does not). Needs a hardware (``hardware=...``).

    Returns:
        ``{family: [(world_size, step seconds), ...]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan_kwargs = {k: v for k, v in plan_kwargs.items() if k not in ("global_batch_size", "devices_per_node")}
    series: dict[str, list[tuple[int, float, bool]]] = {}
    for n in world_sizes:
        try:
            res = plan(config, n, activation_checkpointing=bool(activation_checkpointing), **plan_kwargs)
        except ValueError:  # a layout this world size cannot use (an explicit t or p that does not divide it)
            continue
        if res["hardware"] is None:
            raise ValueError("`plot` needs step times: pass `hardware` (a preset such as h100_nvlink) or its fields.")
        for r in res["rows"]:
            series.setdefault(_family(r), []).append((n, r["step_s"], r["fits"] is not False))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, (family, points) in enumerate(series.items()):
        xs, ys = [x for x, _, _ in points], [y * 1e3 for _, y, _ in points]
        style = "--" if family.startswith("PP") else "-"
        (line,) = ax.plot(xs, ys, style, label=family, linewidth=1.2, color=colors[i % len(colors)])
        ax.scatter([x for x, _, f in points if f], [y * 1e3 for _, y, f in points if f], color=line.get_color(), s=14)
        ax.scatter(
            [x for x, _, f in points if not f],
            [y * 1e3 for _, y, f in points if not f],
            facecolors="none",
            edgecolors=line.get_color(),
            s=14,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size (devices)")
    ax.set_ylabel("estimated step time (ms)")
    ax.set_title("Step time per layout (weak scaling; open markers: does not fit)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)
    return {k: [(x, y) for x, y, _ in v] for k, v in series.items()}


# ======================================================================================================== command
_PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _resolve_model_path(model: str) -> Path:
    """``model`` as given, else a packaged preset (``gpt2_124m``, ``model/gpt2_124m.yaml``, ``configs/model/...``)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = model.removeprefix("configs/")
    for candidate in (name, f"{name}.yaml", f"model/{name}", f"model/{name}.yaml"):
        if (_PACKAGED_CONFIGS / candidate).is_file():
            return _PACKAGED_CONFIGS / candidate
    presets = sorted(p.stem for p in (_PACKAGED_CONFIGS / "model").glob("*.yaml"))
    raise FileNotFoundError(
        f"`model`={model!r} does not exist; pass a model preset YAML (packaged presets: {presets}), a checkpoint "
        "of ours (.ckpt file or sharded folder) or a Hugging Face model directory."
    )


def _yaml_fields(path: Path) -> dict[str, Any]:
    """The TransformerConfig mapping of a YAML: bare, under ``config``, or a CLI model config (``model.init_args``)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    for key in ("model", "init_args", "config"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if isinstance(data, dict) and "init_args" in data:
        data = data["init_args"]
    if not isinstance(data, dict):
        raise ValueError(f"`model`={str(path)!r} holds no TransformerConfig mapping (got {type(data).__name__}).")
    return dict(data)


def _fields_of(path: Path) -> dict[str, Any]:
    """TransformerConfig fields described by a YAML, a Hugging Face directory, a .ckpt file or a sharded folder."""
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoConfig

        from lightning_llm.hf import config_from_hf

        return config_from_hf(AutoConfig.from_pretrained(path)).to_dict()
    if path.suffix in (".yaml", ".yml"):
        return _yaml_fields(path)
    from lightning_llm.checkpoint import load_checkpoint
    from lightning_llm.loading import config_of

    if path.is_dir():
        meta = path / "meta.pt"  # a sharded folder: the non-tensor entries (config, tokenizer) without the weights
        if not meta.is_file():
            raise ValueError(
                f"`model`={str(path)!r} is a folder with neither config.json (a Hugging Face model) nor meta.pt (a "
                "sharded Lightning checkpoint)."
            )
        return config_of(load_checkpoint(meta), f"checkpoint {str(path)!r}").to_dict()
    return config_of(load_checkpoint(path), f"checkpoint {str(path)!r}").to_dict()


def model_config(model: str, vocab_size: int | None = None, tokenizer: str | None = None) -> TransformerConfig:
    """The :class:`TransformerConfig` of a model preset YAML, checkpoint or Hugging Face directory, with its vocabulary.

    A model preset carries no vocabulary (the CLI links it from the data module's tokenizer), and a wrong V changes
    P by ``V h``, so V is never assumed: it comes from ``vocab_size``, else the ``tokenizer``, else the model file.

    Args:
        model: a model preset YAML (path or packaged name such as ``gpt2_124m``), a ``.ckpt`` file or sharded
            checkpoint folder written by our modules, or a Hugging Face model directory.
        vocab_size: V, overriding the model file's.
        tokenizer: a tokenizer directory, ``tokenizer.json`` or Hugging Face name whose vocabulary size is V.

    Raises:
        ValueError: when no vocabulary is known, or ``vocab_size`` and ``tokenizer`` disagree.
    """
    path = _resolve_model_path(model)
    fields = _fields_of(path)
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1):
        raise ValueError(f"`vocab_size` must be a positive int, got {vocab_size!r}.")
    if tokenizer is not None:
        from lightning_llm.data.tokenizer import Tokenizer

        tokenizer_vocab = Tokenizer.from_pretrained(tokenizer).vocab_size
        if vocab_size is not None and vocab_size != tokenizer_vocab:
            raise ValueError(
                f"`vocab_size`={vocab_size} disagrees with `tokenizer`={tokenizer!r} ({tokenizer_vocab} tokens); pass "
                "one of them."
            )
        vocab_size = tokenizer_vocab
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
        if (fields.get("padded_vocab_size") or 0) < vocab_size:
            fields.pop("padded_vocab_size", None)
    elif "vocab_size" not in fields:
        raise ValueError(
            f"`model`={model!r} sets no vocabulary (model presets take it from the data module's tokenizer), and "
            "the vocabulary decides the embedding size: pass vocab_size (`--vocab_size 50257` for the GPT-2 "
            "tokenizer) or tokenizer (`--tokenizer DIR`: a tokenizer directory or tokenizer.json)."
        )
    return TransformerConfig.from_dict(fields)


def plan_command(
    model: str,
    world_size: int = 8,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    micro_batch_size: int = 1,
    global_batch_size: int | None = None,
    seq_len: int | None = None,
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true"] = "bf16-mixed",
    hardware: Literal["h100_nvlink", "h200_nvlink", "a100_pcie", "cpu_gloo"] | None = None,
    device_memory_gib: float | None = None,
    peak_tflops: float | None = None,
    compute_efficiency: float | None = None,
    intra_node_gbps: float | None = None,
    inter_node_gbps: float | None = None,
    intra_node_latency_us: float | None = None,
    inter_node_latency_us: float | None = None,
    devices_per_node: int | None = None,
    activation_checkpointing: bool | None = None,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    pipeline_schedules: list[Literal["gpipe", "1f1b", "interleaved", "zero_bubble"]] | None = None,
    virtual_stages: int = 2,
    module: Literal["causal_lm", "dpo", "ppo", "grpo", "reward_model"] = "causal_lm",
    lora_rank: int | None = None,
    serve_lengths: list[int] | None = None,
    json: str | None = None,
    plot: str | None = None,
    plot_world_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """Plan every parallel layout (DDP, FSDP, FSDP2 + tensor parallel, pipeline): memory, collective bytes, step time.

    Prints the table and the ranked recommendation (with the limit that binds) and returns the plan. Example:
    ``lightning-llm plan --model gpt2_124m --vocab_size 50257 --world_size 8 --hardware h100_nvlink``.
    Bandwidths are GB/s (gigabytes, per direction, per device).

    Args:
        model: the model: a model preset YAML (a path, or a packaged preset name such as gpt2_124m), a .ckpt file or
            sharded checkpoint folder written by our modules, or a Hugging Face model directory.
        world_size: number of devices N.
        vocab_size: vocabulary size V (required when the model file has none, as model presets do, unless
            tokenizer is given).
        tokenizer: a tokenizer directory, tokenizer.json or Hugging Face name; its vocabulary size is V.
        micro_batch_size: sequences per device (per data-parallel rank) and forward pass.
        global_batch_size: examples per optimizer step (default: micro_batch_size x world_size); DPO and reward
            models count preference pairs (two sequences each).
        seq_len: tokens per sequence (default: the model's block_size); also the training length for the positional
            advice.
        precision: the Trainer's precision.
        hardware: a hardware preset (h100_nvlink, h200_nvlink, a100_pcie, cpu_gloo) giving peak FLOP/s, memory,
            bandwidths and latencies; the options below override its fields. Without it (and without overrides)
            only memory and bytes are planned.
        device_memory_gib: memory per device in GiB (default: the hardware's); each row says whether it fits (10%
            headroom).
        peak_tflops: dense 16-bit peak TFLOP/s per device (overrides the hardware's).
        compute_efficiency: achieved fraction of peak FLOP/s (MFU), e.g. 0.4.
        intra_node_gbps: bandwidth between devices of a node, GB/s per direction.
        inter_node_gbps: bandwidth per device across nodes, GB/s per direction.
        intra_node_latency_us: latency of one collective step inside a node, microseconds.
        inter_node_latency_us: latency of one collective step across nodes, microseconds.
        devices_per_node: devices per node (default: the hardware's, else min(world_size, 8)).
        activation_checkpointing: evaluate only with (true) or without (false) per-block activation checkpointing
            (default: both).
        tensor_parallel_size: plan only layouts with this tensor-parallel degree.
        pipeline_parallel_size: plan only pipeline layouts with this many stages.
        pipeline_schedules: pipeline schedules to plan (default: gpipe, 1f1b, interleaved, zero_bubble).
        virtual_stages: model chunks per rank of the interleaved schedule.
        module: what is trained: causal_lm (also SFT), dpo (policy + frozen reference), ppo (policy, value, frozen
            reference and reward model), grpo (policy + frozen reference) or reward_model.
        lora_rank: train LoRA adapters of this rank instead of all weights (the LoRA reference shares the base).
        serve_lengths: sequence lengths you will serve; adds positional-encoding advice (RoPE scaling, ALiBi).
        json: also write the plan as JSON to this file.
        plot: also plot step time per layout against world size to this image file (needs hardware).
        plot_world_sizes: world sizes of the plot (default 1, 2, 4, ..., 64).

    Returns:
        :func:`plan`'s result with ``model`` (the resolved path), ``config`` (the TransformerConfig as a dict) and,
        with serve_lengths, ``positional_advice``.
    """
    cfg = model_config(model, vocab_size=vocab_size, tokenizer=tokenizer)
    overrides = {
        "memory_gib": device_memory_gib if hardware is not None else None,
        "peak_tflops": peak_tflops,
        "compute_efficiency": compute_efficiency,
        "intra_node_gbps": intra_node_gbps,
        "inter_node_gbps": inter_node_gbps,
        "intra_node_latency_us": intra_node_latency_us,
        "inter_node_latency_us": inter_node_latency_us,
        "devices_per_node": devices_per_node if hardware is not None else None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if hardware is None and overrides:
        raise ValueError(
            f"{sorted('--' + k for k in overrides)} override a hardware preset's fields: also pass --hardware (one of "
            f"{sorted(HARDWARE)}) and override what differs."
        )
    kwargs: dict[str, Any] = {
        "precision": precision,
        "micro_batch_size": micro_batch_size,
        "seq_len": seq_len,
        "device_memory_gib": device_memory_gib,
        "activation_checkpointing": activation_checkpointing,
        "hardware": hardware,
        "tensor_parallel_size": tensor_parallel_size,
        "pipeline_parallel_size": pipeline_parallel_size,
        "pipeline_schedules": tuple(pipeline_schedules or SCHEDULES),
        "virtual_stages": virtual_stages,
        "module": module,
        "lora_rank": lora_rank,
        **overrides,
    }
    result = plan(cfg, world_size, devices_per_node=devices_per_node, global_batch_size=global_batch_size, **kwargs)
    result = {"model": str(_resolve_model_path(model)), "config": cfg.to_dict(), **result}
    if serve_lengths:
        result["positional_advice"] = positional_advice(seq_len or cfg.block_size, serve_lengths, cfg.pos_encoding)
    print(format_plan(result))
    if plot is not None:
        result["plot"] = {"path": os.fspath(plot)}
        result["plot"]["series"] = plot_plan(cfg, plot, tuple(plot_world_sizes or (1, 2, 4, 8, 16, 32, 64)), **kwargs)
        print(f"plot: {plot}")
    if json is not None:
        from lightning_llm._io import atomic_write_text

        atomic_write_text(os.fspath(json), dumps(result, indent=2) + "\n")
    return result
