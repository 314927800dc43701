"""Distributed training presets (DDP, FSDP, FSDP2 + tensor parallel), the FSDP2 ``parallelize`` function and a memory planner.

Three ways in:

* ``Trainer(strategy=ddp())``, ``Trainer(strategy=fsdp())`` (CUDA only) or ``Trainer(strategy=fsdp2(tensor_parallel_size=2))``;
* the YAML presets under ``configs/trainer/`` (they name the classes below by ``class_path``);
* inside any LightningModule: ``parallelize(self.model, self.device_mesh)`` in ``configure_model`` under
  :class:`FSDP2Strategy` (Lightning's ``ModelParallelStrategy``), exactly as :class:`~lightning_llm.CausalLM` does.

``parallelize`` follows torchtitan's order: tensor parallelism first (``parallelize_module`` on the attention and MLP
projections over the ``"tensor_parallel"`` mesh dimension), then activation checkpointing per block, then
``torch.compile`` per block, then ``fully_shard`` (FSDP2) per block and on the root over ``"data_parallel"``.

Notation (memory planner):
    P    parameters (all, embeddings included); P_blk those inside the transformer blocks, P_rest = P - P_blk.
    N    world size (devices); d data-parallel size, t tensor-parallel size (N = d * t); g ranks per node (HYBRID).
    L    layers; h width (n_embd); a heads; s sequence length; b micro-batch size per device; V vocabulary.
    e    bytes per activation element (2 under 16-bit / mixed precision, 4 under 32-bit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.transformer import Block

__all__ = [
    "BlockFSDPStrategy",
    "FSDP2Strategy",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "apply_tensor_parallel",
    "clip_grad_norm_",
    "ddp",
    "format_plan",
    "fsdp",
    "fsdp2",
    "parallelize",
    "plan",
    "sharded_state_bytes",
]

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
_PARALLELIZED = "_lightning_llm_parallelized"


# ======================================================================================================== helpers
def _dtype(value: Any, name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"`{name}` must be a torch dtype or its name (e.g. 'bfloat16', 'float32'), got {value!r}.")


def _mp_policy(mp_policy: Any) -> Any:
    """``None``, a ``MixedPrecisionPolicy`` or a dict of its fields (dtype names allowed, as in YAML)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mp_policy is None or isinstance(mp_policy, MixedPrecisionPolicy):
        return mp_policy or MixedPrecisionPolicy()
    if not isinstance(mp_policy, dict):
        raise TypeError(
            f"`mp_policy` must be None, a torch.distributed.fsdp.MixedPrecisionPolicy or a dict such as "
            f"{{'param_dtype': 'bfloat16', 'reduce_dtype': 'float32'}}, got {type(mp_policy).__name__}."
        )
    kwargs = dict(mp_policy)
    for key in ("param_dtype", "reduce_dtype", "output_dtype"):
        if key in kwargs:
            kwargs[key] = _dtype(kwargs[key], f"mp_policy[{key!r}]")
    return MixedPrecisionPolicy(**kwargs)


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"parallelize expects a lightning_llm Transformer (a module with a `blocks` ModuleList), got "
            f"{type(model).__name__}. Convert Hugging Face models with `convert_pretrained=true`, or call "
            "apply_fsdp/apply_activation_checkpointing on your own module list."
        )
    return blocks


def _unwrap(block: nn.Module) -> nn.Module:
    """The Block inside activation-checkpoint / compile wrappers."""
    for attr in ("_checkpoint_wrapped_module", "_orig_mod"):
        while hasattr(block, attr):
            block = getattr(block, attr)
    return block


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _mesh_dim(device_mesh: Any, name: str) -> Any | None:
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    return device_mesh[name] if name in names else None


# ======================================================================================================== parallelize
def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> nn.Module:
    """Megatron-style tensor parallelism on every block, in place.

    q/k/v and MLP up/gate are split by output features (``ColwiseParallel``: each rank owns a contiguous slice of the
    heads / hidden units), o_proj and down_proj by input features (``RowwiseParallel``: partial sums all-reduced), so a
    block costs two all-reduces forward and two backward. Embeddings, norms and the output head stay replicated.
    ``attn.tp_rank`` tells ALiBi which slice of the head slopes this rank owns.

    Raises:
        ValueError: when ``n_head``, ``n_kv_head`` or ``intermediate_size`` is not divisible by the tensor-parallel size.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = tp_mesh.size()
    cfg: TransformerConfig | None = getattr(model, "config", None)
    if cfg is not None:
        for name in ("n_head", "n_kv_head", "intermediate_size"):
            value = getattr(cfg, name)
            if value % t:
                raise ValueError(
                    f"tensor_parallel_size={t} must divide TransformerConfig.{name}={value} (each rank holds "
                    f"{name}/tensor_parallel_size of them); choose a tensor_parallel_size among the common divisors of "
                    f"n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head} and intermediate_size={cfg.intermediate_size}."
                )
    for wrapped in _blocks(model):
        block = _unwrap(wrapped)
        plan: dict[str, Any] = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if getattr(block.mlp, "gate_proj", None) is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        block.attn.tp_rank = tp_mesh.get_local_rank()
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every block in a non-reentrant activation checkpoint (only the block input is kept; the rest is recomputed).

    State-dict keys stay unchanged: torch's distributed state-dict utilities and the wrapper's own hooks strip the
    ``_checkpoint_wrapped_module`` prefix.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        if not isinstance(block, CheckpointWrapper):
            blocks[i] = checkpoint_wrapper(block)
    return model


def apply_compile(model: nn.Module, options: bool | dict[str, Any] = True) -> nn.Module:
    """``torch.compile`` each block separately (repeated structure compiles once and keeps FSDP2's per-block hooks)."""
    kwargs = {} if options is True else dict(options)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        if not hasattr(block, "_orig_mod"):
            blocks[i] = torch.compile(block, **kwargs)
    return model


def apply_fsdp(
    model: nn.Module,
    dp_mesh: Any,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm, head) over ``dp_mesh``.

    Each rank keeps ``1/d`` of every parameter (dim-0 shards, padded to a multiple of ``d``); a block's full weights
    exist only between its all-gather and reshard, and gradients are reduce-scattered (averaged over ``d``).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": _mp_policy(mp_policy),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for block in _blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def parallelize(
    model: nn.Module,
    device_mesh: Any,
    activation_checkpointing: bool = False,
    compile: bool | dict[str, Any] = False,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, per-block compile and FSDP2 to a Transformer, in place.

    Call it from ``LightningModule.configure_model`` under :class:`FSDP2Strategy` / ``ModelParallelStrategy``.
    Calling it again on the same model does nothing. A model built on the meta device is materialised after
    sharding (``to_empty`` + ``Transformer.reset_parameters``), so each rank only ever allocates its shards.

    Args:
        model: a :class:`~lightning_llm.nn.Transformer` (anything with a ``blocks`` ModuleList of blocks).
        device_mesh: the strategy's mesh with dims ``("data_parallel", "tensor_parallel")`` (a 1-D mesh is taken as
            data parallel).
        activation_checkpointing: recompute each block in the backward instead of storing its activations.
        compile: ``torch.compile`` each block (``True`` or a dict of ``torch.compile`` keyword arguments).
        reshard_after_forward: free gathered block weights after the forward (ZeRO-3); ``False`` keeps them until the
            backward (ZeRO-2-like, more memory, one all-gather fewer).
        mp_policy: FSDP2 mixed precision: a ``MixedPrecisionPolicy`` or a dict
            (``{"param_dtype": "bfloat16", "reduce_dtype": "float32"}``).
        cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory (``CPUOffloadPolicy``).

    Returns:
        The same model.
    """
    if getattr(model, _PARALLELIZED, False):
        return model
    if not isinstance(activation_checkpointing, bool):
        raise TypeError(f"`activation_checkpointing` must be a bool, got {activation_checkpointing!r}.")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"`compile` must be a bool or a dict of torch.compile keyword arguments, got {compile!r}.")
    _blocks(model)
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if names and "data_parallel" not in names and "tensor_parallel" not in names:
        raise ValueError(
            f"`device_mesh` must have a 'data_parallel' and/or 'tensor_parallel' dimension, got dims {names}; use the "
            "mesh of lightning_llm.strategies.FSDP2Strategy (Lightning's ModelParallelStrategy)."
        )
    dp_mesh = _mesh_dim(device_mesh, "data_parallel") if names else device_mesh
    tp_mesh = _mesh_dim(device_mesh, "tensor_parallel")
    meta = _has_meta(model)
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model, compile)
    tp_size = tp_mesh.size() if tp_mesh is not None else 1
    if dp_mesh is not None and (dp_mesh.size() > 1 or tp_size == 1):  # torchtitan: no FSDP over a 1-rank dp dim
        apply_fsdp(model, dp_mesh, reshard_after_forward, mp_policy, cpu_offload)
    if meta:
        device = torch.device(device_mesh.device_type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        with torch.device(device):  # overrides the meta-device context configure_model runs under
            model.to_empty(device=device)
            reset = getattr(model, "reset_parameters", None)
            if not callable(reset):
                raise TypeError(f"{type(model).__name__} was built on the meta device but has no reset_parameters().")
            reset()
    setattr(model, _PARALLELIZED, True)
    return model


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of plain tensors and DTensors on different meshes.

    Under tensor parallelism the block weights are DTensors on the 2-D mesh while the replicated embeddings and norms
    are plain tensors (or DTensors on the data-parallel mesh); torch's version stacks their norms and fails. Here each
    group's norm is reduced to a full (replicated) value first (torchtitan does the same), then combined.

    Returns:
        The total norm (a plain scalar tensor) before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in group]), norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


def _patch_gradient_clipping(precision_plugin: Any) -> None:
    """Make a Lightning precision plugin clip by norm with :func:`clip_grad_norm_` (mixed-mesh safe)."""
    if getattr(precision_plugin, "_lightning_llm_clip", False):
        return

    def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        clip_grad_norm_(precision_plugin.main_params(optimizer), clip_val)

    precision_plugin.clip_grad_by_norm = clip_grad_by_norm
    precision_plugin._lightning_llm_clip = True


def sharded_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank actually holds for parameters and optimizer states (local shards of DTensors)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    optim += local(value).numel() * local(value).element_size()
    return {"param_bytes": params, "optimizer_bytes": optim, "total_bytes": params + optim}


# ======================================================================================================== strategies
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 + tensor parallel) with LLM defaults and atomic sharded saves.

    Differences from the parent:

    * ``data_parallel_size="auto"`` means *all remaining devices* (world size / tensor-parallel size), not the number
      of nodes, and ``tensor_parallel_size`` defaults to 1 (plain FSDP2);
    * the :func:`parallelize` options live here (``parallelize_kwargs``) so YAML presets can set them; a
      LightningModule passes them on (``CausalLM`` does);
    * ``meta_init=True`` runs ``configure_model`` on the meta device; :func:`parallelize` materialises the shards;
    * a sharded checkpoint is written to a temporary folder and renamed into place, so a run killed while saving
      leaves the previous checkpoint intact.

    Args:
        tensor_parallel_size: t, devices per tensor-parallel group.
        data_parallel_size: d; ``"auto"`` = world size / t.
        save_distributed_checkpoint: write a sharded DCP folder (one file per rank) instead of gathering one file.
        activation_checkpointing, compile, reshard_after_forward, mp_policy, cpu_offload: see :func:`parallelize`.
        meta_init: build the model on the meta device (large models; every rank allocates only its shards).
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        data_parallel_size: int | Literal["auto"] = "auto",
        save_distributed_checkpoint: bool = True,
        activation_checkpointing: bool = False,
        compile: bool | dict[str, Any] = False,
        reshard_after_forward: bool = True,
        mp_policy: dict[str, Any] | None = None,
        cpu_offload: bool = False,
        meta_init: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        for name, value in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(
                    f"`{name}` must be a positive int{' or auto' if name[0] == 'd' else ''}, got {value!r}."
                )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        _mp_policy(mp_policy)  # validate early
        self.parallelize_kwargs: dict[str, Any] = {
            "activation_checkpointing": activation_checkpointing,
            "compile": compile,
            "reshard_after_forward": reshard_after_forward,
            "mp_policy": mp_policy,
            "cpu_offload": cpu_offload,
        }
        self.meta_init = meta_init

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        t = self._tensor_parallel_size
        if t == "auto":
            t = self._tensor_parallel_size = self.num_processes
        if world % t:
            raise ValueError(
                f"tensor_parallel_size={t} must divide the world size {world} (num_nodes * devices); change devices "
                "or tensor_parallel_size."
            )
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world // t
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        _patch_gradient_clipping(self.precision_plugin)

    def tensor_init_context(self, empty_init: bool | None = None):
        return super().tensor_init_context(empty_init=self.meta_init if empty_init is None else empty_init)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.parent / f".{path.name}.tmp-{self.broadcast(uuid.uuid4().hex[:8])}"
        super().save_checkpoint(checkpoint, tmp, storage_options)  # every rank writes its shard into tmp
        self.barrier()
        if self.global_rank == 0:
            _replace_dir(tmp, path)
        self.barrier()


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``; the old ``dst`` stays whole (renamed aside) until then."""
    old = None
    if dst.is_dir():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    elif dst.exists():
        dst.unlink()
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's (FSDP1) ``FSDPStrategy`` with litgpt's settings: wrap and checkpoint each transformer ``Block``.

    CUDA only (Lightning refuses FSDP on a CPU accelerator).

    Args:
        sharding_strategy: ``"FULL_SHARD"`` (ZeRO-3), ``"SHARD_GRAD_OP"`` (ZeRO-2), ``"HYBRID_SHARD"`` (full shard
            inside a node, replicate across nodes) or ``"NO_SHARD"``.
        state_dict_type: ``"full"`` (one consolidated file, gathered on rank 0) or ``"sharded"`` (a DCP folder).
        cpu_offload: keep parameters and gradients in CPU memory.
        activation_checkpointing: recompute each ``Block`` in the backward.
        **kwargs: anything else ``FSDPStrategy`` takes (``mixed_precision``, ``limit_all_gathers``, ``device_mesh``...).
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        activation_checkpointing: bool = True,
        **kwargs: Any,
    ) -> None:
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"`sharding_strategy` must be one of {SHARDING_STRATEGIES}, got {sharding_strategy!r}.")
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"`state_dict_type` must be 'full' or 'sharded', got {state_dict_type!r}.")
        kwargs.setdefault("auto_wrap_policy", {Block})
        if activation_checkpointing:
            kwargs.setdefault("activation_checkpointing_policy", {Block})
        super().__init__(
            sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, cpu_offload=cpu_offload, **kwargs
        )


def ddp(find_unused_parameters: bool = False, **kwargs: Any) -> DDPStrategy:
    """``DDPStrategy``: full replica per device, gradients all-reduced (gloo on CPU, nccl on CUDA, picked by Lightning)."""
    kwargs.setdefault("gradient_as_bucket_view", True)
    return DDPStrategy(find_unused_parameters=find_unused_parameters, **kwargs)


def fsdp(
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
    state_dict_type: Literal["full", "sharded"] = "full",
    cpu_offload: bool = False,
    activation_checkpointing: bool = True,
    **kwargs: Any,
) -> BlockFSDPStrategy:
    """FSDP (v1) wrapped and checkpointed per ``Block`` (litgpt's settings); see :class:`BlockFSDPStrategy`."""
    return BlockFSDPStrategy(sharding_strategy, state_dict_type, cpu_offload, activation_checkpointing, **kwargs)


def fsdp2(tensor_parallel_size: int = 1, **kwargs: Any) -> FSDP2Strategy:
    """FSDP2 (+ tensor parallel when ``tensor_parallel_size > 1``) through ``ModelParallelStrategy``; see :class:`FSDP2Strategy`."""
    return FSDP2Strategy(tensor_parallel_size=tensor_parallel_size, **kwargs)


# ======================================================================================================== planner
_PRECISIONS = {
    "32-true": (4, False),
    "32": (4, False),
    "bf16-mixed": (2, True),
    "16-mixed": (2, True),
    "bf16-true": (2, False),
    "16-true": (2, False),
}


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
    s, b, h, a, n_layer = seq_len, micro_batch_size, cfg.n_embd, cfg.n_head, cfg.n_layer
    t, e = tensor_parallel_size, bytes_per_element
    attn_term = 0.0 if fused_attention else 5 * a * s / (h * t)
    per_layer = s * b * h * (10 + 24 / t + attn_term) * e / 2
    if activation_checkpointing:
        layers = n_layer * e * s * b * h + per_layer
    else:
        layers = n_layer * per_layer
    head = 4 * min(b * s, 4096) * cfg.padded_vocab_size + 2 * e * s * b * h
    return int(layers + head)


def plan(
    config: TransformerConfig | dict[str, Any],
    world_size: int,
    precision: str = "bf16-mixed",
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    device_memory_gb: float | None = None,
    activation_checkpointing: bool | None = None,
    devices_per_node: int | None = None,
    tensor_parallel_sizes: Sequence[int] = (2, 4, 8),
    fused_attention: bool = True,
) -> dict[str, Any]:
    """Estimate per-device memory of every strategy and recommend the cheapest-communication one that fits.

    Model states per device (bytes; AdamW keeps 2 fp32 states; mixed precision adds fp32 master weights to 16-bit
    compute copies, as Lightning's FSDP does: the sharded fp32 parameters are the master weights, the gathered
    16-bit copy is transient):

    ============== =========================== ============================== ============================
    strategy        parameters                  gradients                      optimizer (+ fp32 master)
    ============== =========================== ============================== ============================
    DDP             p P                         p P                            8 P (+ 4 P)
    SHARD_GRAD_OP   p P                         p P / N                        (8 P + 4 P) / N
    FULL_SHARD      p P / N (+ 2 gathered blk)  p P / N                        (8 P + 4 P) / N
    HYBRID_SHARD    as FULL_SHARD with N = g ranks per node
    FSDP2+TP        (P_blk / t + P_rest) / d    same split                     same split
    ============== =========================== ============================== ============================

    ``p`` is 4 bytes under 32-bit and ``2`` under 16-bit; under ``*-mixed`` the sharded fp32 parameters double as master
    weights (FSDP, FSDP2) while DDP keeps fp32 parameters and casts per op (autocast), so DDP's master term is 0 and
    ``p = 4``. Activations: :func:`activation_bytes`. Gathered blocks: FULL_SHARD / FSDP2 hold two unsharded blocks at
    a time (current + prefetched).

    Args:
        config: a :class:`TransformerConfig` or its dict.
        world_size: N.
        precision: Lightning precision string (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``).
        micro_batch_size: b per device (per data-parallel rank).
        seq_len: s (default ``config.block_size``).
        device_memory_gb: memory per device; when given, the recommendation is the first row that fits (with 10%
            headroom for the allocator and the CUDA context), in the order DDP, SHARD_GRAD_OP, FULL_SHARD,
            HYBRID_SHARD, FSDP2+TP (ascending communication), each without then with activation checkpointing.
        activation_checkpointing: evaluate only this setting (``None``: both).
        devices_per_node: g for HYBRID_SHARD (default ``min(N, 8)``).
        tensor_parallel_sizes: the t values to evaluate for FSDP2 + TP (those that divide N and the heads).
        fused_attention: the attention kernel never stores the ``(s, s)`` matrix (SDPA flash / memory-efficient).

    Returns:
        ``{"rows": [dict, ...], "recommendation": dict | None, "notes": str}``; every row has ``strategy``,
        ``activation_checkpointing``, ``params_gb``, ``grads_gb``, ``optimizer_gb``, ``activations_gb``, ``total_gb``,
        ``fits`` (None when no device memory is given) and the byte counts (``*_bytes``).
    """
    cfg = config if isinstance(config, TransformerConfig) else TransformerConfig.from_dict(dict(config))
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}.")
    if precision not in _PRECISIONS:
        raise ValueError(f"`precision` must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"`micro_batch_size` must be a positive int, got {micro_batch_size!r}.")
    s = seq_len or cfg.block_size
    e, mixed = _PRECISIONS[precision]
    n = world_size
    p_total = cfg.num_parameters(non_embedding=False)
    p_rest = _rest_params(cfg, non_embedding=False)
    p_blk = p_total - p_rest
    p_block1 = p_blk // cfg.n_layer
    # bytes per parameter: working copy p, gradient p, optimizer 8 (+4 master under mixed, for sharded strategies)
    if mixed:  # autocast: the fp32 parameters are the master weights, 16-bit copies are made per op / per gather
        p_ddp = g_ddp = p_shard = g_shard = 4
    else:  # 32-true, or *-true 16-bit: everything (AdamW states included) in the parameter dtype
        p_ddp = g_ddp = p_shard = g_shard = e
    optim = 2 * p_shard  # AdamW exp_avg + exp_avg_sq
    g = devices_per_node or min(n, 8)
    checkpoint_choices = [False, True] if activation_checkpointing is None else [bool(activation_checkpointing)]

    def row(
        name: str, params: float, grads: float, opt: float, t: int, ac: bool, gathered: float = 0.0, **extra: Any
    ) -> dict[str, Any]:
        act = activation_bytes(cfg, micro_batch_size, s, e, t, ac, fused_attention)
        params = params + gathered
        total = params + grads + opt + act
        gb = 1024**3
        out = {
            "strategy": name,
            "activation_checkpointing": ac,
            "params_bytes": int(params),
            "grads_bytes": int(grads),
            "optimizer_bytes": int(opt),
            "activations_bytes": int(act),
            "total_bytes": int(total),
            "sharded_params_bytes": int(params - gathered),  # persistent parameter storage (no transient gathers)
            "gathered_bytes": int(gathered),
            "params_gb": round(params / gb, 3),
            "grads_gb": round(grads / gb, 3),
            "optimizer_gb": round(opt / gb, 3),
            "activations_gb": round(act / gb, 3),
            "total_gb": round(total / gb, 3),
            "fits": None if device_memory_gb is None else bool(total <= 0.9 * device_memory_gb * gb),
        }
        out.update(extra)
        return out

    rows: list[dict[str, Any]] = []
    for ac in checkpoint_choices:
        rows.append(row("DDP", p_ddp * p_total, g_ddp * p_total, optim * p_total, 1, ac))
    if n > 1:
        gathered = 2 * e * p_block1  # current + prefetched unsharded block (compute dtype)
        for ac in checkpoint_choices:
            # ZeRO-2: parameters stay gathered between forward and backward (sharded fp32 + full compute copy)
            full = p_shard * p_total / n + e * p_total if mixed else p_shard * p_total
            rows.append(row("FSDP SHARD_GRAD_OP", full, g_shard * p_total / n, optim * p_total / n, 1, ac))
        for ac in checkpoint_choices:
            rows.append(
                row(
                    "FSDP FULL_SHARD",
                    p_shard * p_total / n,
                    g_shard * p_total / n,
                    optim * p_total / n,
                    1,
                    ac,
                    gathered,
                )
            )
        if g < n and n % g == 0:
            for ac in checkpoint_choices:
                rows.append(
                    row(
                        f"FSDP HYBRID_SHARD (g={g})",
                        p_shard * p_total / g,
                        g_shard * p_total / g,
                        optim * p_total / g,
                        1,
                        ac,
                        gathered,
                    )
                )
        for t in tensor_parallel_sizes:
            if t > n or n % t or cfg.n_head % t or cfg.n_kv_head % t or cfg.intermediate_size % t:
                continue
            d = n // t
            local = (p_blk / t + p_rest) / d
            gathered_tp = 2 * e * p_block1 / t if d > 1 else 0
            for ac in checkpoint_choices:
                rows.append(
                    row(
                        f"FSDP2+TP (d={d}, t={t})",
                        p_shard * local,
                        g_shard * local,
                        optim * local,
                        t,
                        ac,
                        gathered_tp,
                        data_parallel_size=d,
                        tensor_parallel_size=t,
                    )
                )
    recommendation = None
    if device_memory_gb is not None:
        recommendation = next((r for r in rows if r["fits"]), None)
    notes = (
        f"P={p_total:,} parameters ({p_blk:,} in blocks), precision={precision}, b={micro_batch_size}, s={s}, N={n}. "
        "Activations after Korthikanti et al. 2022 (fused attention drops the 5as/h term)."
    )
    return {"rows": rows, "recommendation": recommendation, "notes": notes}


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a fixed-width table (GiB per device), with the recommendation underneath."""
    head = f"{'strategy':<26} {'act.ckpt':>8} {'params':>9} {'grads':>9} {'optim':>9} {'activ.':>9} {'total':>9} {'fits':>5}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        fits = "" if r["fits"] is None else ("yes" if r["fits"] else "no")
        lines.append(
            f"{r['strategy']:<26} {('yes' if r['activation_checkpointing'] else 'no'):>8} {r['params_gb']:>9.3f} "
            f"{r['grads_gb']:>9.3f} {r['optimizer_gb']:>9.3f} {r['activations_gb']:>9.3f} {r['total_gb']:>9.3f} {fits:>5}"
        )
    lines.append(result["notes"])
    rec = result.get("recommendation")
    if rec is not None:
        lines.append(
            f"recommended: {rec['strategy']}, activation checkpointing {'on' if rec['activation_checkpointing'] else 'off'}"
        )
    elif any(r["fits"] is not None for r in result["rows"]):
        lines.append("recommended: nothing fits; lower micro_batch_size / seq_len or add devices")
    return "\n".join(lines)


def _config_from_file(path: str) -> TransformerConfig:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for key in ("model", "init_args", "config"):  # accept a CLI config or a bare TransformerConfig mapping
        if isinstance(data, dict) and key in data and isinstance(data[key], dict):
            data = data[key]
    if isinstance(data, dict) and "init_args" in data:
        data = data["init_args"]
    return TransformerConfig.from_dict(data)


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m lightning_llm.strategies plan --config configs/model/gpt2_124m.yaml --world-size 8 --device-memory-gb 80``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_llm.strategies", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="estimate per-device memory of each strategy and recommend one")
    p.add_argument("--config", required=True, help="a YAML with a TransformerConfig (bare, or a CLI model config)")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--precision", default="bf16-mixed", choices=sorted(_PRECISIONS))
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device-memory-gb", type=float, default=None)
    p.add_argument("--devices-per-node", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = plan(
        _config_from_file(args.config),
        args.world_size,
        precision=args.precision,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        device_memory_gb=args.device_memory_gb,
        devices_per_node=args.devices_per_node,
    )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
