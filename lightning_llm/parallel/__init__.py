"""Parallel training: parallelize functions (FSDP2, tensor parallel), Lightning strategy presets, the memory planner.

* :mod:`~lightning_llm.parallel.parallelize`: plain-torch functions applied to a Transformer on a ``DeviceMesh``;
* :mod:`~lightning_llm.parallel.pipeline`: pipeline stages of a Transformer on ``torch.distributed.pipelining``;
* :mod:`~lightning_llm.parallel.presets`: ``Trainer(strategy=...)`` presets and the classes the YAML presets name;
* :mod:`~lightning_llm.parallel.planner`: memory, communication, step time of every layout, ``lightning-llm plan``;
* :mod:`~lightning_llm.parallel.hardware`: hardware presets (H100/H200 NVLink, A100 PCIe, CPU gloo) for the planner;
* :mod:`~lightning_llm.parallel.consolidate`: a sharded checkpoint folder read (or written) as one checkpoint.
"""

from lightning_llm.parallel.consolidate import consolidate_checkpoint, load_sharded_checkpoint
from lightning_llm.parallel.hardware import HARDWARE, Hardware, hardware_preset
from lightning_llm.parallel.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    apply_tensor_parallel,
    clip_grad_norm_,
    parallelize,
    shard_alibi_slopes,
    shard_heads,
    sharded_state_bytes,
)
from lightning_llm.parallel.pipeline import PipelineRunner, bubble_fraction, split_layers, split_model
from lightning_llm.parallel.planner import (
    activation_bytes,
    format_plan,
    model_config,
    plan,
    plan_command,
    plot_plan,
    positional_advice,
)
from lightning_llm.parallel.presets import (
    SHARDING_STRATEGIES,
    BlockFSDPStrategy,
    FSDP2Strategy,
    PipelineStrategy,
    ddp,
    fsdp,
    fsdp2,
    pipeline_parallel,
)

__all__ = [
    "HARDWARE",
    "Hardware",
    "hardware_preset",
    "plot_plan",
    "positional_advice",
    "SHARDING_STRATEGIES",
    "BlockFSDPStrategy",
    "FSDP2Strategy",
    "PipelineRunner",
    "PipelineStrategy",
    "activation_bytes",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "apply_tensor_parallel",
    "bubble_fraction",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "ddp",
    "format_plan",
    "fsdp",
    "fsdp2",
    "load_sharded_checkpoint",
    "model_config",
    "parallelize",
    "pipeline_parallel",
    "plan",
    "plan_command",
    "shard_alibi_slopes",
    "shard_heads",
    "sharded_state_bytes",
    "split_layers",
    "split_model",
]
