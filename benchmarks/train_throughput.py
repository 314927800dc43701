"""Training throughput: our Transformer against Hugging Face ``LlamaForCausalLM``, and ALiBi against RoPE.

Notation: B batch, T sequence length, L layers, H heads, Q head dim, N non-embedding parameters.

One training step is forward + backward + AdamW step on a fixed random batch. Every model gets ``--warmup`` untimed
steps, then the models take turns for ``--rounds`` rounds of ``--steps`` timed steps each (interleaving spreads the
noise of a shared machine evenly over the contenders); the reported step time is the median over all timed steps.
Tokens/s = B * T / step time. On CUDA the table also shows MFU = tokens/s * (6 N + 12 L H Q T) / peak FLOP/s.
On CPU it also shows the process's CPU time per step (``time.process_time``) and its ratios: with ``--threads 1`` this
is the cost of the step itself, unaffected by other processes competing for the cores (wall-clock ratios on a busy
machine are noise; several OpenMP threads per process on an oversubscribed machine even spin against each other).
Ratios are throughput ratios: > 1.00x means faster than the reference column.

The Hugging Face model is ``lightning_llm.hf.to_hf`` of a freshly initialised ``ours-rope`` Transformer (same width,
depth, heads, KV heads, MLP width, norm epsilon, RoPE base and untied embeddings), with ``attn_implementation="sdpa"``;
it computes its loss from ``labels`` (shifted inside), ours from ``targets`` (already shifted), both a mean cross-entropy over the batch.

Example (CPU defaults, ~1-2 minutes on 2 cores)::

    python benchmarks/train_throughput.py

GPU, bf16 autocast, GPT-2-small-shaped, with torch.compile::

    python benchmarks/train_throughput.py --n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50304 \
        --seq-len 1024 --batch-size 16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import sync, write_json  # noqa: E402

from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.hf import to_hf  # noqa: E402
from lightning_llm.nn import Transformer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-kv-head", type=int, default=None, help="default: n_head (multi-head attention)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=10, help="rounds; models take turns in each")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--precision", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model (mostly useful on CUDA)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak FLOP/s for MFU (H100/H200 dense bf16)")
    p.add_argument("--models", default="ours-rope,hf-llama,ours-alibi", help="comma-separated subset")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the table (row objects), the machine and the commit here")
    return p.parse_args(argv)


def our_config(args: argparse.Namespace, pos_encoding: str) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=args.vocab_size,
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        n_kv_head=args.n_kv_head,
        pos_encoding=pos_encoding,
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    )


def build_hf_llama(cfg: TransformerConfig) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of the shape of ``cfg``: :func:`lightning_llm.hf.to_hf` of a fresh Transformer."""
    return to_hf(Transformer(cfg), attn_implementation="sdpa", use_cache=False)


def make_step(model: torch.nn.Module, kind: str, ids: torch.Tensor, precision: str) -> Callable[[], float]:
    """A closure running one training step and returning the loss (synchronised)."""
    device = ids.device
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    targets = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)  # (B, T) next token, last ignored

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> float:
        with autocast():
            if kind == "hf":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = model(ids, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def matmul_peak_flops(device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """The best FLOP/s of ``(n, n) @ (n, n)`` fp32 matrix multiplies on ``device`` over about ``seconds`` (2 n^3 FLOP
    each): the roof a training step on this machine can reach (its matmuls are the same kernels, smaller)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    torch.manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)  # (B, T)

    rope_cfg = our_config(args, "rope")
    steps: dict[str, Callable[[], float]] = {}
    flops: dict[str, float] = {}
    for name in names:
        if name == "hf-llama":
            model, kind, cfg = build_hf_llama(rope_cfg), "hf", rope_cfg
        elif name.startswith("ours-"):
            cfg = our_config(args, name.removeprefix("ours-"))
            model, kind = Transformer(cfg), "ours"
        else:
            raise ValueError(f"--models: unknown model {name!r}; choose from ours-rope, ours-alibi, hf-llama.")
        model.to(device).train()
        if args.compile:
            model = torch.compile(model)
        steps[name] = make_step(model, kind, ids, precision)
        flops[name] = cfg.flops_per_token(args.seq_len)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n_params / 1e6:.2f}M parameters, {flops[name] / 1e6:.1f} MFLOP/token", flush=True)

    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            loss = step()
        sync(device)
        print(f"warmup {name}: {time.perf_counter() - t0:.1f}s, loss {float(loss):.3f}", flush=True)

    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)

    tokens = args.batch_size * args.seq_len
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    # CPU: the limit is this machine's own fp32 matrix-multiply rate, measured now (same threads, same load)
    peak = args.peak_flops if device.type == "cuda" else matmul_peak_flops(device)
    torch_threads = torch.get_num_threads() if device.type == "cpu" else None
    print()
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch_threads} threads'})"
        f" torch={torch.__version__} precision={precision} compile={args.compile} L={args.n_layer} C={args.n_embd}"
        f" H={args.n_head} G={args.n_kv_head or args.n_head} V={args.vocab_size} T={args.seq_len} B={args.batch_size}"
        f" timed steps/model={args.rounds * args.steps}"
    )
    header = (
        f"| {'model':<11} | {'step ms (median)':>16} | {'tokens/s':>10} | {'vs hf-llama':>11} | {'vs ours-rope':>12} |"
    )
    header += f" {'GFLOP/s':>8} | {'MFU':>6} |"
    if device.type != "cuda":  # CPU seconds of this process per step: robust to other processes sharing the cores
        header += f" {'CPU ms/step':>11} | {'CPU vs hf':>9} | {'CPU vs rope':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for name in names:
        step_ms = statistics.median(times[name]) * 1e3
        vs_hf = f"{tps[name] / tps['hf-llama']:.2f}x" if "hf-llama" in tps else "-"
        vs_rope = f"{tps[name] / tps['ours-rope']:.2f}x" if "ours-rope" in tps else "-"
        achieved = tps[name] * flops[name]
        record = {"model": name, "step_ms": step_ms, "tokens_per_s": tps[name], "vs_hf_llama": vs_hf,
                  "vs_ours_rope": vs_rope, "gflops": achieved / 1e9, "mfu": achieved / peak}  # fmt: skip
        row = f"| {name:<11} | {step_ms:>16.1f} | {tps[name]:>10.0f} | {vs_hf:>11} | {vs_rope:>12} |"
        row += f" {achieved / 1e9:>8.1f} | {achieved / peak:>6.1%} |"
        if device.type != "cuda":
            cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
            cpu_hf = f"{cpu['hf-llama'] / cpu[name]:.2f}x" if "hf-llama" in cpu else "-"
            cpu_rope = f"{cpu['ours-rope'] / cpu[name]:.2f}x" if "ours-rope" in cpu else "-"
            row += f" {cpu[name] * 1e3:>11.1f} | {cpu_hf:>9} | {cpu_rope:>11} |"
            record.update(cpu_ms_per_step=cpu[name] * 1e3, cpu_vs_hf_llama=cpu_hf, cpu_vs_ours_rope=cpu_rope)
        print(row)
        rows.append(record)
    limit = "peak FLOP/s given by --peak-flops" if device.type == "cuda" else "fp32 matmul rate measured in this run"
    print(f"MFU = model FLOP/s (fwd + bwd, {flops[names[0]] / 1e6:.1f} MFLOP/token for {names[0]}) / {peak / 1e9:.1f}"
          f" GFLOP/s ({limit})")  # fmt: skip
    write_json(args.json, rows, device, peak_flops=peak, peak_kind=limit, args=vars(args))


if __name__ == "__main__":
    main()
