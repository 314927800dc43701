"""Worker for ``test_comm_bytes.py``: count the bytes each collective moves in one training step of a tiny Transformer.

``N`` gloo processes build the same model, parallelize it (``ddp``: torch's ``DistributedDataParallel``, the wrapper
Lightning's DDP strategy applies; ``fsdp2`` / ``tp`` / ``fsdp2_tp``: our :func:`~lightning_llm.parallel.parallelize`
on a ``(data_parallel, tensor_parallel)`` mesh), run one warm-up step, then count one forward + backward +
AdamW step. Counting: a ``TorchDispatchMode`` sees every collective that goes through the dispatcher (``c10d.*`` ops
issued by ``torch.distributed``, DDP's reducer and FSDP2, and ``_c10d_functional.*`` ops issued by DTensor), and adds
the payload of each: the all-reduce tensor, the all-gather OUTPUT, the reduce-scatter INPUT, the sent tensor (the
sizes ``S`` that the ring volumes ``2 (n-1)/n S`` and ``(n-1)/n S`` are taken of). DDP's reducer launches its bucket
all-reduces from C++ through the dispatcher as well, so the same mode counts them.

Run as ``python tests/parallel/_comm_bytes_worker.py WORLD_SIZE OUT.json ddp,fsdp2,tp,fsdp2+ac,...`` (``+ac``: with
per-block activation checkpointing). Rank 0 writes ``{"config": {...}, "micro_batch_size": b, "results": [{"layout",
"payload": {kind: bytes}, "calls": {kind: count}, ...}, ...]}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.nn.transformer import Transformer  # noqa: E402
from lightning_llm.parallel import parallelize  # noqa: E402

# every dim 0 divisible by 4: FSDP2 pads no shard, so the planner's unpadded sizes are exact
CFG = dict(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, mlp="swiglu")
MICRO_BATCH = 2
PP_MICROBATCHES = 2

# op name (without overload) -> (kind, which argument holds the payload)
_KINDS = {
    "allreduce_": "all_reduce",
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "_allgather_base_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "allgather_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_": "reduce_scatter",
    "send": "send_recv",
    "broadcast_": "broadcast",
    "barrier": "barrier",
}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


class CountCollectives(TorchDispatchMode):
    """Sum the payload bytes of every collective dispatched while active, per kind."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.n = world_size
        self.payload: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional"):
            name = func._opname
            kind = _KINDS.get(name)
            if kind is None:
                if name not in ("wait_tensor", "recv_", "recv_any_source_"):  # the receiving side of a send
                    self.unknown.add(f"{ns}.{name}")
            else:
                self.calls[kind] += 1
                if kind == "all_gather":
                    # c10d._allgather_base_(output, input) / allgather_into_tensor_coalesced_(outputs, inputs);
                    # functional all_gather_into_tensor(input, group_size, group): output = group_size x input
                    if ns == "_c10d_functional":
                        self.payload[kind] += _nbytes(args[0]) * args[1]
                    else:
                        self.payload[kind] += _nbytes(args[0])
                elif kind == "reduce_scatter":
                    self.payload[kind] += _nbytes(args[0] if ns == "_c10d_functional" else args[1])
                else:
                    self.payload[kind] += _nbytes(args[0])
        return func(*args, **kwargs)


def measure(rank: int, world: int, layout: str, ac: bool) -> dict:
    """One warm-up step, then one counted step (forward + backward + AdamW) of ``layout``; the counts of this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    cfg = TransformerConfig(**CFG)
    model = Transformer(cfg)
    if layout.startswith("pp_"):
        return measure_pipeline(rank, world, model, layout.removeprefix("pp_"))
    t = {"ddp": 1, "fsdp2": 1, "tp": world, "fsdp2_tp": 2}[layout]
    d = world // t
    if layout == "ddp":
        if ac:
            raise ValueError("activation checkpointing is measured with the FSDP2 / TP layouts")
        model = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (d, t), mesh_dim_names=("data_parallel", "tensor_parallel"))
        parallelize(model, mesh, activation_checkpointing=ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # data-parallel ranks see different rows; the tensor-parallel ranks of one group see the same rows
    g = torch.Generator().manual_seed(rank // t)
    counter = CountCollectives(world)
    for step in range(2):
        ids = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, cfg.block_size + 1), generator=g)
        if step == 1:
            counter.__enter__()
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            counter.__exit__(None, None, None)
    return {
        "payload": dict(counter.payload),
        "calls": dict(counter.calls),
        "unknown": sorted(counter.unknown),
        "layout": layout,
        "world_size": world,
        "data_parallel_size": d,
        "tensor_parallel_size": t,
        "activation_checkpointing": ac,
    }


def measure_pipeline(rank: int, world: int, model: Transformer, schedule: str) -> dict:
    """``world`` pipeline stages (one block each at n_layer = world) of lightning_llm.parallel.pipeline, m = 2."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_llm.parallel.pipeline import split_model

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pipeline_parallel",))
    model = split_model(model, mesh, schedule=schedule, n_microbatches=PP_MICROBATCHES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    counter = CountCollectives(world)
    for step in range(2):
        ids = torch.randint(
            0, model.config.vocab_size, (PP_MICROBATCHES * MICRO_BATCH, CFG["block_size"] + 1), generator=g
        )
        if step == 1:
            counter.__enter__()
        model.pipeline.train_step(ids[:, :-1], ids[:, 1:])
        opt.step()
        opt.zero_grad()
        if step == 1:
            counter.__exit__(None, None, None)
    sent = [None] * world  # what every stage sent: the planner reports the busiest rank
    dist.all_gather_object(sent, dict(counter.payload))
    return {
        "payload": dict(counter.payload),
        "calls": dict(counter.calls),
        "per_rank_payload": sent,
        "unknown": sorted(counter.unknown),
        "layout": f"pp_{schedule}",
        "world_size": world,
        "data_parallel_size": 1,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": world,
        "micro_batches": PP_MICROBATCHES,
        "activation_checkpointing": False,
    }


def run(rank: int, world: int, port: int, layouts: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for spec in layouts:
        layout, _, ac = spec.partition("+")
        results.append(measure(rank, world, layout, ac == "ac"))
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"config": CFG, "micro_batch_size": MICRO_BATCH, "results": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    world_, out_, layouts_ = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(run, args=(world_, free_port, layouts_, out_), nprocs=world_)
