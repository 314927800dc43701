"""Worker for ``test_meta_init_tensor_parallel_alibi``: 2 gloo ranks build an ALiBi Transformer on the meta device,
``parallelize`` it over a (data_parallel=1, tensor_parallel=2) mesh, and compare its logits with a plain model that
holds the same (gathered) weights. Rank 0 writes ``{"slopes": [per rank], "max_abs_diff": float}`` as JSON.

Run as ``python tests/parallel/_meta_tp_worker.py OUT.json``.
"""

from __future__ import annotations

import json
import os
import socket
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.nn.transformer import Transformer  # noqa: E402
from lightning_llm.parallel import parallelize  # noqa: E402

CFG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos_encoding="alibi")


def run(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    cfg = TransformerConfig(**CFG, attention_backend="eager")
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, mesh)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    ref = Transformer(cfg)
    ref.load_state_dict(full)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - ref(ids)).abs().max().item()
    slopes = [None, None]
    dist.all_gather_object(slopes, model.blocks[1].attn.alibi_slopes.tolist())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"slopes": slopes, "max_abs_diff": diff}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(run, args=(free_port, sys.argv[1]), nprocs=2, join=True)
