"""DDP vs FSDP2 vs FSDP2 + tensor parallel on 2 CPU processes (gloo): per-rank memory of states, throughput, loss.

    python benchmarks/distributed.py [--steps 20] [--n-layer 4] [--n-embd 256]

For each strategy the script re-launches itself as a 2-process Lightning run of the same model, seed and global batch
(DDP / FSDP2: 2 data-parallel ranks x B; FSDP2+TP: 1 data-parallel rank of 2 tensor-parallel ranks x 2B), and
measures on rank 0:

* parameter + AdamW-state bytes held by the rank (local shards of DTensors, after the first step);
* training tokens/s over the steps after the first two (global tokens per second of wall time);
* the final training loss (averaged over ranks), which must agree across strategies.

The table gives each number and its ratio to DDP. Goal: FSDP2 holds <= 0.55x of DDP's per-rank states.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

STRATEGIES = ("ddp", "fsdp2", "fsdp2_tp")


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from _common import step_probe, token_rows_dataset
    from torch.utils.data import DataLoader

    from lightning_llm.config import TransformerConfig
    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.parallel import ddp, fsdp2

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n_rows = args.steps * args.batch_size * 2
    steps = torch.randint(0, 3, (n_rows, args.block_size + 1), generator=g)
    tokens = (torch.randint(0, args.vocab_size, (n_rows, 1), generator=g) + steps.cumsum(1)) % args.vocab_size
    tp = args.worker == "fsdp2_tp"
    strategy = {"ddp": lambda: ddp(), "fsdp2": lambda: fsdp2(), "fsdp2_tp": lambda: fsdp2(tensor_parallel_size=2)}
    cfg = TransformerConfig(
        vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=8, n_embd=args.n_embd
    )
    model = CausalLM(config=cfg, learning_rate=1e-3, warmup_steps=2)
    per_rank_batch = args.batch_size * (2 if tp else 1)
    loader = DataLoader(token_rows_dataset(tokens), batch_size=per_rank_batch, shuffle=False)
    probe = step_probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy[args.worker](), precision="32-true", max_steps=args.steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[probe], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    if trainer.is_global_zero:
        global_tokens = 2 * args.batch_size * args.block_size
        tps = global_tokens * (len(probe.times) - 2) / (probe.times[-1] - probe.times[1])
        Path(args.out).write_text(json.dumps({"bytes": probe.bytes, "tokens_per_sec": tps, "losses": probe.losses}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="per data-parallel rank (global batch = 2x)")
    p.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in STRATEGIES:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(out.read_text())
    base = results["ddp"]
    print(
        f"2 CPU processes (gloo), fp32, n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab_size} "
        f"T={args.block_size}, global batch {2 * args.batch_size}, {args.steps} steps, AdamW"
    )
    head = f"{'strategy':<10} {'params MiB':>10} {'optim MiB':>10} {'states/rank':>12} {'x DDP':>6} {'tokens/s':>9} {'x DDP':>6} {'final loss':>11}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        b = r["bytes"]
        print(
            f"{name:<10} {b['param_bytes'] / 2**20:>10.2f} {b['optimizer_bytes'] / 2**20:>10.2f} "
            f"{b['total_bytes'] / 2**20:>10.2f}Mi {b['total_bytes'] / base['bytes']['total_bytes']:>6.3f} "
            f"{r['tokens_per_sec']:>9.0f} {r['tokens_per_sec'] / base['tokens_per_sec']:>6.2f} {r['losses'][-1]:>11.5f}"
        )
    ratio = results["fsdp2"]["bytes"]["total_bytes"] / base["bytes"]["total_bytes"]
    same = abs(results["fsdp2"]["losses"][-1] - base["losses"][-1]) < 1e-4
    print(f"goal FSDP2 <= 0.55x DDP states: {'met' if ratio <= 0.55 else 'MISSED'} ({ratio:.3f}x); same loss: {same}")


if __name__ == "__main__":
    main()
