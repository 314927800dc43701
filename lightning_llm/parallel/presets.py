"""Lightning strategy presets: DDP, FSDP (v1, per block) and FSDP2 + tensor parallel through ``ModelParallelStrategy``.

Three ways in:

* ``Trainer(strategy=ddp())``, ``Trainer(strategy=fsdp())`` (CUDA only) or
  ``Trainer(strategy=fsdp2(tensor_parallel_size=2))``;
* the YAML presets under ``configs/trainer/`` (they name the classes below by ``class_path``);
* inside any LightningModule: :func:`~lightning_llm.parallel.parallelize` ``(self.model, self.device_mesh)`` in
  ``configure_model`` under :class:`FSDP2Strategy`, exactly as :class:`~lightning_llm.CausalLM` does.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_llm._dist import ended_at_exit
from lightning_llm.nn.transformer import Block
from lightning_llm.parallel.parallelize import _mp_policy, clip_grad_norm_

__all__ = [
    "SHARDING_STRATEGIES",
    "BlockFSDPStrategy",
    "FSDP2Strategy",
    "PipelineStrategy",
    "ddp",
    "fsdp",
    "fsdp2",
    "pipeline_parallel",
]

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


def _patch_gradient_clipping(precision_plugin: Any, pipeline_group: Any = None) -> None:
    """Make a Lightning precision plugin clip by norm with :func:`clip_grad_norm_` (mixed-mesh and pipeline safe)."""
    precision_plugin._lightning_llm_pipeline_group = pipeline_group
    if getattr(precision_plugin, "_lightning_llm_clip", False):
        return

    def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        group = precision_plugin._lightning_llm_pipeline_group
        clip_grad_norm_(precision_plugin.main_params(optimizer), clip_val, pipeline_group=group)

    precision_plugin.clip_grad_by_norm = clip_grad_by_norm
    precision_plugin._lightning_llm_clip = True


def _mesh_sizes(
    world: int, pipeline: int, data: int | Literal["auto"], tensor: int | Literal["auto"], auto_tensor: int
) -> tuple[int, int]:
    """``(data, tensor)`` sizes of a ``pipeline x data x tensor`` device mesh over ``world`` ranks.

    ``tensor="auto"`` becomes ``auto_tensor`` (the devices of one node for FSDP2 + TP, 1 under pipelining), then
    ``data="auto"`` takes the ranks left over. Raises ``ValueError`` naming the sizes when they do not multiply to
    ``world``.
    """
    t = auto_tensor if tensor == "auto" else tensor
    if world % (pipeline * t):
        raise ValueError(
            f"pipeline_parallel_size={pipeline} x tensor_parallel_size={t} must divide the world size {world} "
            "(num_nodes * devices); change devices, pipeline_parallel_size or tensor_parallel_size."
        )
    d = world // (pipeline * t) if data == "auto" else data
    if pipeline * d * t != world:
        raise ValueError(
            f"pipeline_parallel_size={pipeline} x data_parallel_size={d} x tensor_parallel_size={t} = "
            f"{pipeline * d * t} must equal the world size {world}; use data_parallel_size='auto'."
        )
    return d, t


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 + tensor parallel) with LLM defaults and atomic sharded saves.

    Differences from the parent:

    * ``data_parallel_size="auto"`` means *all remaining devices* (world size / tensor-parallel size), not the number
      of nodes, and ``tensor_parallel_size`` defaults to 1 (plain FSDP2);
    * the :func:`~lightning_llm.parallel.parallelize` options live here (``parallelize_kwargs``) so YAML presets can
      set them; a LightningModule passes them on (``CausalLM`` does);
    * ``meta_init=True`` runs ``configure_model`` on the meta device; :func:`~lightning_llm.parallel.parallelize`
      materialises the shards;
    * a sharded checkpoint is written to a temporary folder and renamed into place, so a run killed while saving
      leaves the previous checkpoint intact.

    Args:
        tensor_parallel_size: t, devices per tensor-parallel group.
        data_parallel_size: d; ``"auto"`` = world size / t.
        save_distributed_checkpoint: write a sharded DCP folder (one file per rank) instead of gathering one file.
        activation_checkpointing, compile, reshard_after_forward, mp_policy, cpu_offload: see
            :func:`~lightning_llm.parallel.parallelize`.
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
        self._data_parallel_size, self._tensor_parallel_size = _mesh_sizes(
            self.num_nodes * self.num_processes,
            1,
            self._data_parallel_size,
            self._tensor_parallel_size,
            self.num_processes,
        )
        with ended_at_exit():  # a gloo group left to interpreter finalization can abort the process (_dist)
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

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded (DCP) folder as Lightning does, except that parameters without optimizer state in it stay
        without state.

        An optimizer keeps no state for a parameter that never had a gradient (the unused ``lm_head`` of a reward or
        value model's backbone). torch's ``get_optimizer_state_dict`` gives a fresh optimizer state for EVERY trainable
        parameter (a zero-learning-rate step), so Lightning's load asks the checkpoint for entries it never had and
        fails; here those entries are left out of the request, and the loaded optimizer holds exactly the saved state,
        as the uninterrupted run does. A single-file checkpoint takes Lightning's path.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path.is_dir() and (path / ".metadata").is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.model
        module_state = {"state_dict": get_model_state_dict(module)}
        _distributed_checkpoint_load(module_state, path)
        module.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
        saved = list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            prefix = f"{key}.state."
            # "optimizer_0.state.<parameter fqn>.<state name>" -> the parameters that have state in the checkpoint
            stored = {k[len(prefix) :].rsplit(".", 1)[0] for k in saved if k.startswith(prefix)}
            optim_state = get_optimizer_state_dict(module, optimizer)
            optim_state["state"] = {fqn: s for fqn, s in optim_state["state"].items() if fqn in stored}
            request = {key: optim_state}
            _distributed_checkpoint_load(request, path)
            options = StateDictOptions(cpu_offload=True, strict=False)  # strict: a state for every parameter
            set_optimizer_state_dict(module, optimizer, request[key], options=options)
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


class PipelineStrategy(FSDP2Strategy):
    """Pipeline parallelism (``torch.distributed.pipelining``) composed with FSDP2 and tensor parallelism.

    The world is a 3-D ``DeviceMesh`` ``("pipeline_parallel", "data_parallel", "tensor_parallel")`` of sizes
    ``(p, d, t)``, pipeline outermost (across nodes: only activations cross it, point to point), tensor parallel
    innermost (within a node). ``configure_model`` (through :func:`~lightning_llm.parallel.parallelize`) prunes the
    Transformer to this rank's stages (:func:`~lightning_llm.parallel.pipeline.split_model`: blocks split by layer,
    embeddings on the first stage, final norm + head + loss on the last), then applies tensor parallelism and FSDP2
    over the data-parallel dimension to each stage. A LightningModule runs its batches through ``model.pipeline``:
    ``train_step`` runs the schedule's forward AND backward inside ``training_step`` and returns the loss (the same on
    every rank of the pipeline), so this strategy skips Lightning's backward; ``CausalLM`` does this for you, and its
    validation / test run forward-only through the pipeline. Gradient clipping uses the norm over all stages.

    Args:
        pipeline_parallel_size: p, the number of pipeline ranks.
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"looped_bfs"``, ``"interleaved_zero_bubble"`` or
            ``"zbv_zero_bubble"`` (the zero-bubble ones where the installed torch has them).
        n_microbatches: m, micro-batches per batch (must divide the per-rank batch size; default p x stages per rank).
        stages_per_rank: v for the interleaved schedules (default 2).
        balance: ``"layers"`` (equal blocks per stage; the stage count must divide ``n_layer``) or ``"params"``
            (uneven counts that balance the parameters, the embeddings and head included).
        layers_per_stage: explicit block counts per stage.
        tensor_parallel_size, data_parallel_size, ...: see :class:`FSDP2Strategy` (``data_parallel_size="auto"`` =
            world / (p t)).
    """

    def __init__(
        self,
        pipeline_parallel_size: int = 2,
        schedule: str = "1f1b",
        n_microbatches: int | None = None,
        stages_per_rank: int | None = None,
        balance: Literal["layers", "params"] = "layers",
        layers_per_stage: list[int] | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_size: int | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        from lightning_llm.parallel.pipeline import check_schedule

        if (
            not isinstance(pipeline_parallel_size, int)
            or isinstance(pipeline_parallel_size, bool)
            or (pipeline_parallel_size < 1)
        ):
            raise ValueError(f"`pipeline_parallel_size` must be a positive int, got {pipeline_parallel_size!r}.")
        check_schedule(schedule, stages_per_rank)
        if n_microbatches is not None and (not isinstance(n_microbatches, int) or n_microbatches < 1):
            raise ValueError(f"`n_microbatches` must be a positive int or None, got {n_microbatches!r}.")
        if balance not in ("layers", "params"):
            raise ValueError(f"`balance` must be 'layers' or 'params', got {balance!r}.")
        if kwargs.get("meta_init"):
            raise ValueError(
                "`meta_init=True` is not supported with pipeline parallelism yet: every rank builds the full model "
                "(same seed) and keeps its stages, which is what makes the split model equal the unsplit one."
            )
        if kwargs.get("save_distributed_checkpoint") is False and pipeline_parallel_size > 1:
            raise ValueError(
                "`save_distributed_checkpoint=False` is not supported with pipeline parallelism (each rank holds other "
                "layers): keep the sharded (DCP) checkpoints and turn one into a single file with `lightning-llm "
                "export` / lightning_llm.parallel.consolidate_checkpoint."
            )
        super().__init__(tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size, **kwargs)
        self.pipeline_parallel_size = pipeline_parallel_size
        self.parallelize_kwargs["pipeline"] = {
            "schedule": schedule,
            "n_microbatches": n_microbatches,
            "stages_per_rank": stages_per_rank,
            "balance": balance,
            "layers_per_stage": layers_per_stage,
        }
        self._pipelined = False

    def setup_environment(self) -> None:
        from lightning.pytorch.strategies.parallel import ParallelStrategy
        from torch.distributed.device_mesh import init_device_mesh

        p = self.pipeline_parallel_size
        d, t = _mesh_sizes(
            self.num_nodes * self.num_processes, p, self._data_parallel_size, self._tensor_parallel_size, 1
        )
        self._tensor_parallel_size, self._data_parallel_size = t, d
        ParallelStrategy.setup_environment(self)
        with ended_at_exit():  # a gloo group left to interpreter finalization can abort the process (_dist)
            self._setup_distributed()
        self._device_mesh = init_device_mesh(
            self.root_device.type,
            (p, d, t),
            mesh_dim_names=("pipeline_parallel", "data_parallel", "tensor_parallel"),
        )
        self.lightning_module._device_mesh = self._device_mesh

    def setup(self, trainer: Any) -> None:
        if self.pipeline_parallel_size > 1 and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported with pipeline parallelism "
                "(the schedule already accumulates over micro-batches): raise n_microbatches and the batch size instead."
            )
        super().setup(trainer)
        self._pipelined = any(hasattr(m, "pipeline") for m in self.lightning_module.modules())
        group = self.device_mesh["pipeline_parallel"].get_group() if self._pipelined else None
        _patch_gradient_clipping(self.precision_plugin, group)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state keyed by flat parameter names (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``).

        Each pipeline rank holds other parameters; in torch's nested layout every rank would write its own
        ``param_groups[i]["params"]`` list under the same DCP key and only one would survive. The flat layout
        (torchtitan's) gives every entry a key of its own.
        """
        if not self._pipelined:
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.model, optimizer, options=_flat_options())

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load this rank's stages (and their optimizer states) from a DCP folder written by :meth:`save_checkpoint`."""
        if not self._pipelined:
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path.is_dir() and (path / ".metadata").is_file()):
            raise ValueError(
                f"`ckpt_path` must be a sharded checkpoint folder written under pipeline parallelism, got {str(path)!r}; "
                "a single-file checkpoint can be loaded as the initial weights (CausalLM(pretrained=PATH)) instead."
            )
        module = self.model
        module_state = {"state_dict": get_model_state_dict(module)}
        _distributed_checkpoint_load(module_state, path)
        module.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            optim_state = {f"optimizer_{idx}": get_optimizer_state_dict(module, optimizer, options=_flat_options())}
            _distributed_checkpoint_load(optim_state, path)
            set_optimizer_state_dict(module, optimizer, optim_state[f"optimizer_{idx}"], options=_flat_options())
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The pipeline schedule already ran the backward inside ``training_step``: only Lightning's hooks run here."""
        if not self._pipelined:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss


def _flat_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(cpu_offload=True, flatten_optimizer_state_dict=True)


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
    """``DDPStrategy``: a full replica per device, gradients all-reduced (gloo on CPU, nccl on CUDA)."""
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


def pipeline_parallel(pipeline_parallel_size: int = 2, schedule: str = "1f1b", **kwargs: Any) -> PipelineStrategy:
    """Pipeline parallelism (+ FSDP2 / tensor parallel on the remaining devices); see :class:`PipelineStrategy`."""
    return PipelineStrategy(pipeline_parallel_size=pipeline_parallel_size, schedule=schedule, **kwargs)


def fsdp2(tensor_parallel_size: int = 1, **kwargs: Any) -> FSDP2Strategy:
    """FSDP2 (+ tensor parallel when ``tensor_parallel_size > 1``) through ``ModelParallelStrategy``.

    See :class:`FSDP2Strategy` for the keyword arguments.
    """
    return FSDP2Strategy(tensor_parallel_size=tensor_parallel_size, **kwargs)
