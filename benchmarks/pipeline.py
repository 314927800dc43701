"""Pipeline schedules vs the bubble model, and per-rank memory vs DDP and FSDP2, on CPU processes (gloo) or CUDA.

    python benchmarks/pipeline.py [--devices 2] [--steps 12] [--n-layer 8] [--n-embd 128] [--json PATH]

Every configuration re-launches this script as a Lightning run of the same model, seed and global batch ``B``:

* ``single``: one process, batch B (the time reference T1 for one step);
* ``ddp`` / ``fsdp2``: ``--devices`` data-parallel ranks, B / devices each;
* ``pp:<schedule>``: ``--devices`` pipeline ranks (PipelineStrategy), B per step in m micro-batches.

Measured on every rank and reduced (max over ranks): the median step time over the steps after the first two, the
parameter + AdamW-state bytes the rank holds (local shards), and the peak resident memory of the process (RSS: includes
the ~0.3-0.5 GB of the Python / torch runtime, so differences matter, not totals). The last loss must agree across the
multi-process configurations (same batches and initialisation; the one-process run here draws its initial weights
from another RNG state, so its loss differs: tests/parallel/test_pipeline.py checks pipelined = one process exactly).

The bubble model: with p equal stages and m micro-batches, an ideal pipeline step takes
``(T1 / p) / (1 - bubble)``, bubble = ``(p - 1) / (m + p - 1)`` for GPipe / 1F1B, ``(p - 1) / (v m + p - 1)``
interleaved (v stages per rank), a third of that for zero bubble
(:func:`lightning_llm.parallel.bubble_fraction`). The table prints measured / predicted: above 1 is communication,
stage imbalance (the first stage embeds, the last computes the head and the loss) and, on a shared CPU, contention.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble")


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from _common import step_probe, token_rows_dataset
    from torch.utils.data import DataLoader

    from lightning_llm.config import TransformerConfig
    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.parallel import PipelineStrategy, ddp, fsdp2

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n_rows = args.steps * args.batch_size
    steps = torch.randint(0, 3, (n_rows, args.block_size + 1), generator=g)
    tokens = (torch.randint(0, args.vocab_size, (n_rows, 1), generator=g) + steps.cumsum(1)) % args.vocab_size
    name = args.worker
    devices = 1 if name == "single" else args.devices
    accelerator = "gpu" if args.cuda else "cpu"
    if name == "single":
        strategy, batch = "auto", args.batch_size
    elif name == "ddp":
        strategy, batch = ddp(), args.batch_size // devices
    elif name == "fsdp2":
        strategy, batch = fsdp2(), args.batch_size // devices
    else:
        schedule = name.split(":", 1)[1]
        v = 2 if schedule.startswith("interleaved") else None
        strategy = PipelineStrategy(
            pipeline_parallel_size=devices, schedule=schedule, n_microbatches=args.microbatches, stages_per_rank=v
        )
        batch = args.batch_size
    cfg = TransformerConfig(
        vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd
    )
    model = CausalLM(config=cfg, learning_rate=1e-3, warmup_steps=2)
    loader = DataLoader(token_rows_dataset(tokens), batch_size=batch, shuffle=False)
    probe = step_probe()
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, precision="32-true", max_steps=args.steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[probe], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    step = statistics.median(b - a for a, b in zip(probe.times[2:], probe.times[3:]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if args.cuda:
        rss = torch.cuda.max_memory_allocated()
    values = torch.tensor([step, float(probe.bytes["total_bytes"]), float(rss)], dtype=torch.float64)
    if trainer.world_size > 1:
        values = trainer.strategy.reduce(values.to(trainer.strategy.root_device), reduce_op="max").cpu()
    if trainer.is_global_zero:
        Path(args.out).write_text(
            json.dumps(
                {
                    "step_s": values[0].item(),
                    "state_bytes_max_rank": values[1].item(),
                    "peak_memory_max_rank": values[2].item(),
                    "last_loss": probe.losses[-1],
                }
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8, help="global batch B")
    p.add_argument("--microbatches", type=int, default=4, help="m (must divide B)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--cuda", action="store_true", help="run on CUDA devices (nccl) instead of CPU processes")
    p.add_argument("--configs", default="single,ddp,fsdp2," + ",".join(f"pp:{s}" for s in SCHEDULES))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from _common import write_json

    from lightning_llm.parallel import bubble_fraction
    from lightning_llm.parallel.pipeline import available_schedules

    configs = [c for c in args.configs.split(",") if not c.startswith("pp:") or c[3:] in available_schedules()]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            out = Path(tmp) / f"{name.replace(':', '_')}.json"
            forward = []
            for key in (
                "devices",
                "steps",
                "batch_size",
                "microbatches",
                "block_size",
                "vocab_size",
                "n_layer",
                "n_embd",
            ):
                forward += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            forward += ["--cuda"] if args.cuda else []
            cmd = [sys.executable, __file__, *forward, "--worker", name, "--out", str(out)]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results[name] = json.loads(out.read_text())
            results[name]["wall_s"] = time.perf_counter() - start
    t1 = results.get("single", {}).get("step_s")
    ddp_bytes = results.get("ddp", {}).get("state_bytes_max_rank")
    pp = args.devices
    print(
        f"\nB={args.batch_size} T={args.block_size} n_layer={args.n_layer} n_embd={args.n_embd} "
        f"V={args.vocab_size}, {args.devices} {'CUDA devices' if args.cuda else 'CPU processes (gloo)'}, m="
        f"{args.microbatches}\n"
    )
    header = (
        f"{'config':<28}{'step ms':>9}{'bubble':>8}{'model ms':>10}{'meas/model':>11}"
        f"{'states MB':>11}{'vs DDP':>8}{'peak MB':>9}{'last loss':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        bubble = model_ms = ratio = None
        if name.startswith("pp:") and t1:
            schedule = name[3:]
            v = 2 if schedule.startswith("interleaved") else 1
            bubble = bubble_fraction(schedule, pp, args.microbatches, v)
            model_ms = 1e3 * (t1 / pp) / (1 - bubble)
            ratio = 1e3 * r["step_s"] / model_ms
            r.update(bubble=bubble, model_step_s=model_ms / 1e3)
        rel = r["state_bytes_max_rank"] / ddp_bytes if ddp_bytes else None
        r["states_vs_ddp"] = rel
        print(
            f"{name:<28}{1e3 * r['step_s']:>9.1f}"
            f"{'' if bubble is None else f'{bubble:.3f}':>8}"
            f"{'' if model_ms is None else f'{model_ms:.1f}':>10}"
            f"{'' if ratio is None else f'{ratio:.2f}':>11}"
            f"{r['state_bytes_max_rank'] / 2**20:>11.2f}"
            f"{'' if rel is None else f'{rel:.2f}':>8}"
            f"{r['peak_memory_max_rank'] / 2**20:>9.0f}{r['last_loss']:>11.5f}"
        )
    rows = [{"config": name, **r} for name, r in results.items()]
    write_json(args.json, rows, "cuda" if args.cuda else "cpu", args=vars(args))


if __name__ == "__main__":
    main()
