"""FSDP2, tensor parallelism, activation checkpointing and per-block compile of a Transformer; mesh-aware clipping.

``parallelize(model, device_mesh)`` follows torchtitan's order: tensor parallelism first (``parallelize_module`` on
the attention and MLP projections over the ``"tensor_parallel"`` mesh dimension, ALiBi slopes sliced with the heads),
then activation checkpointing per block, then ``torch.compile`` per block, then ``fully_shard`` (FSDP2) per block and
on the root over ``"data_parallel"``. Plain torch: call it from any ``LightningModule.configure_model`` (under
:class:`~lightning_llm.parallel.FSDP2Strategy`) or from a script that built its own ``DeviceMesh``.

Notation: t tensor-parallel size, d data-parallel size, H query heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_llm.config import TransformerConfig
from lightning_llm.parallel.planner import _check_tensor_parallel_size

__all__ = [
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "apply_tensor_parallel",
    "clip_grad_norm_",
    "parallelize",
    "shard_alibi_slopes",
    "shard_heads",
    "sharded_state_bytes",
]

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
    """``None``, a ``MixedPrecisionPolicy`` or a dict of its fields (dtype names allowed, as in YAML) -> the policy."""
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


def _blocks(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The block container: a ModuleList, or a ModuleDict keyed by original index (a pipeline-split model)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.ModuleDict)):
        raise TypeError(
            f"parallelize expects a lightning_llm Transformer (a module with a `blocks` ModuleList), got "
            f"{type(model).__name__}. Load Hugging Face models with `pretrained=PATH` (converted by load_pretrained), or call "
            "apply_fsdp/apply_activation_checkpointing on your own module list."
        )
    return blocks


def _named_blocks(model: nn.Module) -> list[tuple[int | str, nn.Module]]:
    """``(key, block)`` pairs usable as ``blocks[key] = wrapped`` for a ModuleList (int) or ModuleDict (str)."""
    blocks = _blocks(model)
    if isinstance(blocks, nn.ModuleDict):
        return list(blocks.items())
    return list(enumerate(blocks))


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
def shard_alibi_slopes(model: nn.Module, tensor_parallel_size: int, tensor_parallel_rank: int) -> nn.Module:
    """Keep in every attention module only the ALiBi slopes of the heads this tensor-parallel rank computes, in place.

    ``ColwiseParallel`` gives rank r the contiguous heads ``[r H/t, (r+1) H/t)`` of q/k/v, so the ``(H,)`` slopes
    buffer is cut the same way to ``(H/t,)``. Modules without ALiBi (``alibi_slopes is None``) are left alone.
    """
    t, r = tensor_parallel_size, tensor_parallel_rank
    for _, block in _named_blocks(model):
        attn = _unwrap(block).attn
        slopes = getattr(attn, "alibi_slopes", None)
        if slopes is None:
            continue
        if slopes.numel() != attn.n_head:
            raise ValueError(
                f"`alibi_slopes` must hold all {attn.n_head} heads before tensor-parallel sharding, got "
                f"{slopes.numel()}: the model is already sharded; build a fresh model (or call reset_parameters())."
            )
        attn.alibi_slopes = slopes.view(t, -1)[r].clone()  # (H,) -> (t, H/t) -> this rank's (H/t,)
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> nn.Module:
    """Megatron-style tensor parallelism on every block, in place.

    q/k/v and MLP up/gate are split by output features (``ColwiseParallel``: each rank owns a contiguous slice of the
    heads / hidden units), o_proj and down_proj by input features (``RowwiseParallel``: partial sums all-reduced), so a
    block costs two all-reduces forward and two backward. Embeddings, norms and the output head stay replicated. ALiBi
    slopes are sliced to the local heads (:func:`shard_alibi_slopes`), and the Transformer's ``local_kv_heads`` is set to
    ``n_kv_head / t``, so its KV cache holds the key/value heads this rank computes and generation (the rollouts of
    GRPO, RLOO and PPO) runs.

    Raises:
        ValueError: when ``n_head``, ``n_kv_head`` or ``intermediate_size`` is not divisible by the tensor-parallel
            size.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = tp_mesh.size()
    cfg: TransformerConfig | None = getattr(model, "config", None)
    if cfg is not None:
        _check_tensor_parallel_size(cfg, t)
    for _, wrapped in _named_blocks(model):
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
    if cfg is not None and hasattr(model, "local_kv_heads"):  # the KV cache holds the heads this rank computes
        model.local_kv_heads = cfg.n_kv_head // t
    return shard_alibi_slopes(model, t, tp_mesh.get_local_rank())


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every block in a non-reentrant activation checkpoint (only the block input is kept; the rest is recomputed).

    State-dict keys stay unchanged: torch's distributed state-dict utilities and the wrapper's own hooks strip the
    ``_checkpoint_wrapped_module`` prefix.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    blocks = _blocks(model)
    for i, block in _named_blocks(model):
        if not isinstance(block, CheckpointWrapper):
            blocks[i] = checkpoint_wrapper(block)
    return model


def apply_compile(model: nn.Module, options: bool | dict[str, Any] = True) -> nn.Module:
    """``torch.compile`` each block separately (repeated structure compiles once and keeps FSDP2's per-block hooks)."""
    kwargs = {} if options is True else dict(options)
    blocks = _blocks(model)
    for i, block in _named_blocks(model):
        if not hasattr(block, "_orig_mod"):
            blocks[i] = torch.compile(block, **kwargs)
    return model


def apply_fsdp(
    model: nn.Module,
    dp_mesh: Any,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    cpu_offload: bool = False,
    roots: list[nn.Module] | None = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm, head) over ``dp_mesh``.

    Each rank keeps ``1/d`` of every parameter (dim-0 shards, padded to a multiple of ``d``); a block's full weights
    exist only between its all-gather and reshard, and gradients are reduce-scattered (averaged over ``d``).
    ``roots`` replaces the model as the outer ``fully_shard`` targets: a pipeline-split model passes its stage modules
    (the modules whose forward the schedule calls, torchtitan's "model chunks").
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": _mp_policy(mp_policy),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for _, block in _named_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    for root in roots if roots is not None else [model]:
        fully_shard(root, reshard_after_forward=reshard_after_forward, **kwargs)
    if roots is None and hasattr(model, "logits"):
        # `Transformer.logits` (the output projection) is called outside `forward` by generation and the RLHF
        # log-prob passes: register it so FSDP2 all-gathers the root's weights around it like a forward
        register_fsdp_forward_method(model, "logits")
    return model


def parallelize(
    model: nn.Module,
    device_mesh: Any,
    activation_checkpointing: bool = False,
    compile: bool | dict[str, Any] = False,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    cpu_offload: bool = False,
    pipeline: dict[str, Any] | None = None,
) -> nn.Module:
    """Apply pipeline split, tensor parallelism, activation checkpointing, compile and FSDP2 to a Transformer, in place.

    Call it from ``LightningModule.configure_model`` under :class:`~lightning_llm.parallel.FSDP2Strategy` /
    ``ModelParallelStrategy``. Calling it again on the same model does nothing. A model built on the meta device is
    materialised after sharding (``to_empty`` + ``Transformer.reset_parameters``, then the ALiBi slopes are sliced
    again), so each rank only ever allocates its shards.

    Args:
        model: a :class:`~lightning_llm.nn.Transformer` (anything with a ``blocks`` ModuleList of blocks).
        device_mesh: the strategy's mesh with dims ``("data_parallel", "tensor_parallel")``, optionally led by
            ``"pipeline_parallel"`` (:class:`~lightning_llm.parallel.PipelineStrategy`); a 1-D mesh is taken as data
            parallel.
        activation_checkpointing: recompute each block in the backward instead of storing its activations.
        compile: ``torch.compile`` each block (``True`` or a dict of ``torch.compile`` keyword arguments).
        reshard_after_forward: free gathered block weights after the forward (ZeRO-3); ``False`` keeps them until the
            backward (ZeRO-2-like, more memory, one all-gather fewer). A model without trainable parameters (a frozen
            reference or reward model) always reshards after its forward: it never runs a backward, so under ``False``
            its gathered weights would stay on every rank for good.
        mp_policy: FSDP2 mixed precision: a ``MixedPrecisionPolicy`` or a dict
            (``{"param_dtype": "bfloat16", "reduce_dtype": "float32"}``).
        cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory (``CPUOffloadPolicy``).
        pipeline: keyword arguments of :func:`lightning_llm.parallel.pipeline.split_model` (``schedule``,
            ``n_microbatches``, ``stages_per_rank``, ``balance``, ``layers_per_stage``), used when the mesh has a
            ``"pipeline_parallel"`` dimension of size > 1: the model is first pruned to this rank's stages (torchtitan's
            order: pipeline split, then tensor parallel, then FSDP2 on each stage). Under pure pipeline parallelism
            (data-parallel size 1) no FSDP is applied and parameters stay plain tensors.

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
    if names and not {"data_parallel", "tensor_parallel", "pipeline_parallel"} & set(names):
        raise ValueError(
            f"`device_mesh` must have 'data_parallel', 'tensor_parallel' and/or 'pipeline_parallel' dimensions, got "
            f"dims {names}; use the mesh of lightning_llm.parallel.FSDP2Strategy / PipelineStrategy."
        )
    dp_mesh = _mesh_dim(device_mesh, "data_parallel") if names else device_mesh
    tp_mesh = _mesh_dim(device_mesh, "tensor_parallel")
    pp_mesh = _mesh_dim(device_mesh, "pipeline_parallel")
    tp_size = tp_mesh.size() if tp_mesh is not None else 1
    pp_size = pp_mesh.size() if pp_mesh is not None else 1
    meta = _has_meta(model)
    if not any(p.requires_grad for p in model.parameters()):
        reshard_after_forward = True  # frozen: no backward would ever free the gathered weights
    roots = None
    if pp_size > 1:
        from lightning_llm.parallel.pipeline import split_model

        split_model(model, pp_mesh, **(pipeline or {}))
    elif pipeline:
        raise ValueError(
            f"`pipeline` options {sorted(pipeline)} were given but the device mesh has no 'pipeline_parallel' dimension "
            "of size > 1; use lightning_llm.parallel.PipelineStrategy(pipeline_parallel_size=...)."
        )
    if tp_size > 1:
        apply_tensor_parallel(model, tp_mesh)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model, compile)
    if pp_size > 1:
        roots = model.pipeline.build_stage_modules()  # after the block wrappers, before fully_shard
    use_fsdp = dp_mesh is not None and (dp_mesh.size() > 1 or (tp_size == 1 and pp_size == 1))
    if use_fsdp:  # torchtitan: no FSDP over a 1-rank dp dim (except plain FSDP2 on one device)
        apply_fsdp(model, dp_mesh, reshard_after_forward, mp_policy, cpu_offload, roots=roots)
    if meta:
        device = torch.device(device_mesh.device_type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        with torch.device(device):  # overrides the meta-device context configure_model runs under
            model.to_empty(device=device)
            reset = getattr(model, "reset_parameters", None)
            if not callable(reset):
                raise TypeError(f"{type(model).__name__} was built on the meta device but has no reset_parameters().")
            reset()  # rebuilds every head's ALiBi slopes: slice them again
        if tp_size > 1:
            shard_alibi_slopes(model, tp_size, tp_mesh.get_local_rank())
    setattr(model, _PARALLELIZED, True)
    return model


def _data_parallel_mesh(device_mesh: Any) -> Any | None:
    """The mesh FSDP2 shards over (torchtitan's rule, as :func:`parallelize`): the ``"data_parallel"`` dimension (a
    1-D mesh is data parallel), or ``None`` where no FSDP applies (a 1-rank data-parallel dimension next to tensor or
    pipeline parallelism)."""
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    dp_mesh = _mesh_dim(device_mesh, "data_parallel") if names else device_mesh
    tp_mesh, pp_mesh = _mesh_dim(device_mesh, "tensor_parallel"), _mesh_dim(device_mesh, "pipeline_parallel")
    others = (tp_mesh.size() if tp_mesh is not None else 1) * (pp_mesh.size() if pp_mesh is not None else 1)
    if dp_mesh is None or (dp_mesh.size() == 1 and others > 1):
        return None
    return dp_mesh


def shard_heads(
    modules: Iterable[nn.Module],
    device_mesh: Any,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    cpu_offload: bool = False,
    **_: Any,
) -> list[nn.Module]:
    """FSDP2 (``fully_shard``) on small modules that live outside a Transformer, in place: the scalar heads of reward
    and value models.

    Their parameters become DTensors sharded over the data-parallel dimension like the transformers', and their
    gradients are reduce-scattered (averaged over the ranks). Left as plain tensors, no collective would touch them
    under FSDP2 (there is no DDP wrapper): every rank would step its own copy on its own data and the copies would
    drift apart. Each module is gathered around its ``forward`` (a frozen one always reshards after it, as in
    :func:`parallelize`). Under pure tensor parallelism (a 1-rank data-parallel
    dimension) nothing is done: every rank sees the same batch, so replicated heads stay equal. Other keyword
    arguments (the rest of :func:`parallelize`'s options) are ignored; modules already sharded are skipped.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    modules = [m for m in modules if m is not None]
    dp_mesh = _data_parallel_mesh(device_mesh)
    if dp_mesh is None:
        return modules
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for module in modules:
        if getattr(module, _PARALLELIZED, False):
            continue
        frozen = not any(p.requires_grad for p in module.parameters())  # never resharded by a backward
        fully_shard(
            module,
            mesh=dp_mesh,
            reshard_after_forward=reshard_after_forward or frozen,
            mp_policy=_mp_policy(mp_policy),
            offload_policy=offload,
        )
        setattr(module, _PARALLELIZED, True)
    return modules


# ================================================================================================ clipping, sizes
@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, pipeline_group: Any = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of plain tensors and DTensors on different meshes.

    Under tensor parallelism the block weights are DTensors on the 2-D mesh while the replicated embeddings and norms
    are plain tensors (or DTensors on the data-parallel mesh); torch's version stacks their norms and fails. Here each
    group's norm is reduced to a full (replicated) value first (torchtitan does the same), then combined. Under
    pipeline parallelism each rank holds other parameters: ``pipeline_group`` (the pipeline's process group) combines
    the ranks' norms (sum of p-th powers, or max for the infinity norm) into the whole model's norm.

    Returns:
        The total norm (a plain scalar tensor) before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads and pipeline_group is None:
        return torch.tensor(0.0)
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in group]), norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    device = norms[0].device if norms else torch.device("cpu")
    if not norms:
        norms = [torch.zeros((), device=device)]
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if pipeline_group is not None:
        import torch.distributed as dist

        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pipeline_group)
        else:
            total = total.pow(norm_type)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pipeline_group)
            total = total.pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


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
