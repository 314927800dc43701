"""Perplexity update: lightning_llm vs torchmetrics, time and peak memory, printed as a table with ratios.

    python benchmarks/metrics.py                      # CPU, the two shapes of the issue, float32
    python benchmarks/metrics.py --device cuda        # on a GPU
    python benchmarks/metrics.py --shapes 2,128,32000 --repeats 3

Time: wall-clock of one ``metric.update(logits, target)`` on ready inputs (after a warm-up call), min and median
over ``--repeats`` runs, the two implementations interleaved (CUDA: synchronised before and after); also the
process CPU time, less sensitive to other load on a shared machine. On a loaded machine use ``--threads 1``:
multi-threaded kernels then lose whole time slices at their barriers and the numbers mostly measure the load.

Peak memory: the extra memory one update needs on top of its inputs.
* CPU: each (implementation, shape) runs in a *fresh subprocess*, which allocates the inputs, resets the kernel's
  peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads its RSS (``VmRSS``), runs one update and reads the
  peak RSS (``VmHWM``); the difference is the high-water mark of everything the update allocated and touched
  (torch's CPU allocator is plain malloc, so every temporary shows up in RSS; tracemalloc cannot see it).
  Resolution: pages; first-call one-off costs (e.g. lazy library init) are included for both implementations.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory held before.

LAMBADA: the evaluation's wall time against lm-evaluation-harness (``HFLM.loglikelihood``) on the same Hugging Face
model (built and saved offline) and the first 500 passages of OpenAI's LAMBADA test set (``--lambada-data``), with
both sides' acc / ppl; see ``benchmarks/lambada_harness.py`` (also runnable alone). Skipped when ``lm_eval`` is not
installed or the file is absent; ``--skip-lambada`` / ``--only-lambada`` select the parts.

    python benchmarks/metrics.py --only-lambada --threads 1 --lambada-n 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import sync, write_json

SHAPES = [(8, 512, 32000), (4, 1024, 50304)]
IMPLS = ("torchmetrics", "lightning_llm")


def _make_metric(impl: str):
    if impl == "torchmetrics":
        from torchmetrics.text import Perplexity

        return Perplexity()
    from lightning_llm.metrics import Perplexity

    return Perplexity()


def _inputs(shape: tuple[int, int, int], device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, V = shape
    logits = torch.randn(B, T, V, generator=g).to(device=device, dtype=dtype)
    target = torch.randint(V, (B, T), generator=g).to(device)
    return logits, target


def time_updates(shape: tuple[int, int, int], device: str, dtype: torch.dtype, repeats: int) -> dict[str, dict]:
    """Time both implementations on the same inputs, interleaved (A B A B ...) so load drifts hit both alike."""
    logits, target = _inputs(shape, device, dtype)
    metrics = {impl: _make_metric(impl).to(device) for impl in IMPLS}
    for metric in metrics.values():
        metric.update(logits, target)  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    cpu: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats):
        for impl, metric in metrics.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            metric.update(logits, target)
            sync(device)
            times[impl].append(time.perf_counter() - t0)
            cpu[impl].append(time.process_time() - c0)
    return {
        impl: {
            "min_s": min(times[impl]),
            "median_s": statistics.median(times[impl]),
            "cpu_s": min(cpu[impl]),
            "ppl": float(metrics[impl].compute()),
        }
        for impl in IMPLS
    }


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_child(impl: str, shape: tuple[int, int, int], device: str, dtype: torch.dtype) -> int:
    """Runs inside a fresh process: extra peak bytes of one update."""
    logits, target = _inputs(shape, device, dtype)
    metric = _make_metric(impl).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        metric.update(logits, target)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if _reset_peak_rss():  # Linux: peak RSS during the update minus RSS just before it
        before = _proc_status_bytes("VmRSS")
        metric.update(logits, target)
        return max(0, _proc_status_bytes("VmHWM") - before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # fallback: monotone peak, may read 0
    metric.update(logits, target)
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def peak_memory(impl: str, shape: tuple[int, int, int], device: str, dtype: str, threads: int | None) -> int:
    cmd = [sys.executable, __file__, "--child", impl, "--shapes", ",".join(map(str, shape)), "--device", device]
    cmd += ["--dtype", dtype] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="*", default=None, help="B,T,V triples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-lambada", action="store_true", help="skip the LAMBADA vs harness part")
    parser.add_argument("--only-lambada", action="store_true", help="only the LAMBADA vs harness part")
    parser.add_argument("--lambada-n", type=int, default=500, help="LAMBADA: first N passages")
    parser.add_argument("--lambada-data", default=None, help="LAMBADA: lambada_test.jsonl (default: lambada_harness's)")
    parser.add_argument("--lambada-batch-size", type=int, default=16)
    parser.add_argument("--lambada-repeats", type=int, default=2, help="LAMBADA: timed runs per side (min reported)")
    parser.add_argument(
        "--json", default=None, help="write the perplexity table (row objects), machine and commit here"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.child:
        print(json.dumps({"peak_bytes": peak_memory_child(args.child, shapes[0], args.device, dtype)}))
        return

    if not args.only_lambada:
        write_json(args.json, perplexity_table(args, dtype, shapes), args.device, args=vars(args))
    if not args.skip_lambada:
        lambada_table(args)


def lambada_table(args: argparse.Namespace) -> None:
    """LAMBADA evaluation vs lm-evaluation-harness (``benchmarks/lambada_harness.py``), printed as a table."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lambada_harness import LAMBADA, lambada_benchmark

    lambada_benchmark(
        n=args.lambada_n,
        batch_size=args.lambada_batch_size,
        repeats=args.lambada_repeats,
        device=args.device,
        data=args.lambada_data or LAMBADA,
    )


def perplexity_table(args: argparse.Namespace, dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> list[dict]:
    """Perplexity.update vs torchmetrics: time, peak memory, ratios (printed, and returned as row objects)."""
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"Perplexity.update, {args.dtype} logits, device {name}, torch {torch.__version__}")
    header = (
        f"{'shape (B,T,V)':>18} | {'impl':>13} | {'min ms':>8} | {'median ms':>9} | {'CPU ms':>8} | {'peak MiB':>8} | "
        f"{'ppl':>10} | {'speed-up':>8} | {'CPU speed-up':>12} | {'mem ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    table = []
    for shape in shapes:
        rows = time_updates(shape, args.device, dtype, args.repeats)
        for impl in IMPLS:
            rows[impl]["peak"] = peak_memory(impl, shape, args.device, args.dtype, args.threads)
        base = rows["torchmetrics"]
        for impl in IMPLS:
            r = rows[impl]
            speed = base["min_s"] / r["min_s"]
            cpu_speed = base["cpu_s"] / r["cpu_s"]
            mem = r["peak"] / base["peak"] if base["peak"] else float("nan")
            print(
                f"{str(shape):>18} | {impl:>13} | {r['min_s'] * 1e3:8.1f} | {r['median_s'] * 1e3:9.1f} | {r['cpu_s'] * 1e3:8.1f} | "
                f"{r['peak'] / 2**20:8.1f} | {r['ppl']:10.3f} | {speed:7.2f}x | {cpu_speed:11.2f}x | {mem:9.3f}"
            )
            table.append({"shape": list(shape), "impl": impl, **r, "speed_up": speed, "cpu_speed_up": cpu_speed,
                          "mem_ratio": mem})  # fmt: skip
    print(
        "speed-up = torchmetrics min wall time / this min wall time; CPU ms = min process CPU time (all threads);"
        " mem ratio = this peak / torchmetrics peak (extra memory of one update)."
    )
    return table


if __name__ == "__main__":
    main()
