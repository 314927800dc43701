"""The README's result tables, generated from the benchmarks' saved JSON outputs (never typed by hand).

    python benchmarks/readme_tables.py            # rewrite every generated block of README.md
    python benchmarks/readme_tables.py --check    # exit 1 if a block differs from its JSON (what the test runs)

A block in README.md is delimited by ``<!-- results: NAME -->`` and ``<!-- /results -->``; NAME is a file
``benchmarks/results/NAME.json`` written by a benchmark's ``--json`` (rows + the machine + the commit), rendered by the
function registered for it below. The line under each table names the commit, CPU, threads and load average the
numbers were measured with.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

RENDERERS: dict[str, Callable[[dict], list[str]]] = {}


def renders(*names: str) -> Callable:
    def register(fn: Callable[[dict], list[str]]) -> Callable[[dict], list[str]]:
        for name in names:
            RENDERERS[name] = fn
        return fn

    return register


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def provenance(payload: dict) -> str:
    m = payload.get("machine", {})
    load = m.get("load_average")
    load = f", load average {load[0]:.2f}" if isinstance(load, list) and load else ""
    threads = f", {m['torch_threads']} torch threads" if m.get("torch_threads") else ""
    commit = str(m.get("commit", "?"))
    commit = commit[:7] + ("+dirty" if m.get("uncommitted_changes") or commit.endswith("+dirty") else "")
    return f"(commit `{commit}`, {m.get('cpu', '?')}, torch {m.get('torch', '?')}{threads}{load})"


@renders("train_throughput_cpu")
def _train_throughput(payload: dict) -> list[str]:
    rows = [
        [r["model"], f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}", r["vs_hf_llama"], r["vs_ours_rope"],
         f"{r['gflops']:.1f}", f"{r['mfu']:.1%}"]
        for r in payload["rows"]
    ]  # fmt: skip
    peak = payload.get("peak_flops", float("nan")) / 1e9
    return table(["model", "step ms", "tokens/s", "vs HF Llama", "vs ours-rope", "GFLOP/s", "MFU"], rows) + [
        "",
        f"MFU against {peak:.1f} GFLOP/s, the {payload.get('peak_kind', 'peak')} {provenance(payload)}.",
    ]


@renders("metrics_cpu")
def _metrics(payload: dict) -> list[str]:
    by_shape: dict[str, dict[str, dict]] = {}
    for r in payload["rows"]:
        by_shape.setdefault(str(tuple(r["shape"])), {})[r["impl"]] = r
    rows = []
    for shape, impls in by_shape.items():
        tm, ours = impls["torchmetrics"], impls["lightning_llm"]
        rows.append(
            [shape, f"{tm['min_s'] * 1e3:.1f}", f"{ours['min_s'] * 1e3:.1f}", f"{ours['speed_up']:.2f}x",
             f"{tm['peak'] / 2**20:.1f}", f"{ours['peak'] / 2**20:.1f}", f"{ours['mem_ratio']:.3f}"]
        )  # fmt: skip
    header = ["logits (B, T, V)", "torchmetrics ms", "ours ms", "speed-up", "torchmetrics peak MiB", "ours peak MiB",
              "memory ratio"]  # fmt: skip
    return table(header, rows) + ["", f"Measured {provenance(payload)}."]


@renders("sft_cpu")
def _sft(payload: dict) -> list[str]:
    runs, ratios = {r["run"]: r for r in payload["rows"]}, payload["ratios"]
    names = {"ours-full": "ours, full", "trl-full": "TRL, full", "ours-lora": "ours, LoRA", "trl-lora": "TRL, LoRA"}
    rows = []
    for key, label in names.items():
        r = runs[key]
        mode = "full" if key.endswith("full") else "LoRA"
        vs = f"{ratios[f'throughput ours/TRL ({mode})']:.2f}x" if key.startswith("ours") else "1.00x"
        rows.append([label, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", vs, f"{r['train_mb']:.0f}"])
    memory = payload.get("memory_runs") or {}
    lines = table(["run", "step s", "tokens/s", "ours / TRL", "training memory MB (RSS growth)"], rows)
    lines += [
        "",
        f"LoRA / full training memory (ours): {ratios['train memory LoRA/full (ours)']:.2f}x by RSS growth"
        + (
            f", {ratios['tensor memory LoRA/full (ours)']:.2f}x by live tensors"
            f" ({ratios['tensor memory LoRA/full (ours, +recompute)']:.2f}x with activation recomputation on both)"
            if memory
            else ""
        )
        + (
            f"; with `lightning_llm.callbacks.CPUHeapTrim` {ratios['heap-trimmed memory LoRA/full (ours)']:.2f}x by RSS"
            f" growth (step time {ratios['heap trim step time / without (full)']:.2f}x full,"
            f" {ratios['heap trim step time / without (lora)']:.2f}x LoRA)"
            if "heap-trimmed memory LoRA/full (ours)" in ratios
            else ""
        )
        + f"; TRL's {ratios['train memory LoRA/full (TRL)']:.2f}x. First three losses equal TRL's to "
        f"{max(payload['loss_diff'].values()):.0e}. Measured {provenance(payload)}.",
    ]
    return lines


@renders("rollout_cpu")
def _rollout(payload: dict) -> list[str]:
    rows = [[r["measurement"], r["lightning_llm"], r["transformers"], r["ratio"]] for r in payload["rows"]]
    lines = table(["measurement", "lightning_llm", "transformers", "ratio"], rows)
    phases = payload.get("phases") or {}
    if phases:
        names = list(next(iter(phases.values())))
        lines += ["", "Where an iteration's wall time goes (seconds, median over the timed iterations):", ""]
        lines += table(
            ["phase", *(a.upper() for a in phases)],
            [[n, *(f"{phases[a][n]:.4f}" for a in phases)] for n in names],
        )
    first = payload.get("first_compiled_call_s")
    compiled = f" The first compiled call (building the decode step) took {first:.1f} s." if first else ""
    return lines + [
        "",
        f"Greedy outputs identical: {payload.get('identical')}.{compiled} Measured {provenance(payload)}.",
    ]


@renders("quickstart_cpu")
def _quickstart(payload: dict) -> list[str]:
    fit = payload["rows"][0]
    lines = table(
        ["command", "wall s", "exit status", "val ppl", "unigram ppl", "ratio"],
        [[f"`{fit['command']}`", fit["wall_s"], fit["exit_status"], fit["val_ppl"], fit["unigram_ppl"], fit["ratio"]]],
    )
    summary = payload.get("report_summary") or {}
    if summary:
        ev = payload["rows"][1]
        lines += [
            "",
            f"`{ev['command']}` ({ev['wall_s']} s, exit status {ev['exit_status']}), the report's summary:",
            "",
        ]
        lines += table(["metric", "value"], [[k, f"{v:.4g}"] for k, v in summary.items()])
    before = payload.get("load_average_before")
    load = f"load average {before:.2f} before, " if before is not None else ""
    return lines + ["", f"Measured with a fresh cache in an empty folder ({load}{provenance(payload)[1:]}."]


@renders("alignment_cpu")
def _alignment(payload: dict) -> list[str]:
    rows = [[f"`{r['command']}`", r["wall_s"], r["exit_status"], r["result"]] for r in payload["rows"]]
    lines = table(["command", "wall s", "exit status", "result (`fit_metrics.json`, `metrics.csv`)"], rows)
    before = payload.get("load_average_before")
    load = f"load average {before:.2f} before, " if before is not None else ""
    return lines + ["", f"Each in its own empty folder with a fresh cache ({load}{provenance(payload)[1:]}."]


@renders("monitoring_cpu")
def _monitoring(payload: dict) -> list[str]:
    run = payload["run"]
    keys = [k for k in payload["rows"][0] if k != "step"]
    rows = [[r["step"], *(f"{r[k]:.4g}" if k in r else "" for k in keys)] for r in payload["rows"]]
    lines = table(["step", *(f"`{k}`" for k in keys)], rows)
    return lines + [
        "",
        f"`{run['command']}`: {run['wall_s']} s, exit status {run['exit_status']}, {run['columns']} columns in "
        f"`metrics.csv`. Measured {provenance(payload)}.",
    ]


@renders("extrapolation_cpu")
def _extrapolation(payload: dict) -> list[str]:
    lengths = payload["eval_lengths"]
    names = {"embedded": "embedded", "tinyshakespeare": "Tiny Shakespeare"}
    rows = [
        [names.get(r["data"], r["data"]), {"rope": "RoPE", "alibi": "ALiBi"}.get(r["encoding"], r["encoding"]),
         *(f"{r[f'ppl@{n}']:.2f}" for n in lengths)]
        for r in payload["rows"]
    ]  # fmt: skip
    lines = table(["data", "encoding", *(f"ppl @ {n}" for n in lengths)], rows)
    return lines + [
        "",
        f"Trained {payload['steps']} steps at length {payload['train_length']}; the whole notebook took "
        f"{payload['wall_s']:.0f} s. Measured {provenance(payload)}.",
    ]


@renders("grpo_cpu")
def _grpo(payload: dict) -> list[str]:
    rows = [[r["metric"], f"{r['ours']:.4g}", f"{r['trl']:.4g}", f"{r['speedup']:.2f}x"] for r in payload["rows"]]
    lines = table(["metric", "ours", "TRL", "ours vs TRL"], rows)
    phases = payload.get("phases") or {}
    if phases:
        lines += ["", "Where an iteration's wall time goes (seconds, median over the timed iterations):", ""]
        lines += table(
            ["phase", "ours", "TRL"],
            [[n, f"{phases['ours'][n]:.4f}", f"{phases['trl'][n]:.4f}"] for n in phases["ours"]],
        )
    return lines + ["", f"Setting: {payload.get('setting', '?')}. Measured {provenance(payload)}."]


@renders("harness_cpu")
def _harness(payload: dict) -> list[str]:
    def fmt(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.6g}" for k, v in metrics.items())

    rows = [
        [r["kind"], r["requests"], f"{r['lm_seconds']['HFLM']:.2f}", f"{r['lm_seconds']['HarnessLM']:.2f}",
         f"{r['lm_speedup']:.2f}x", f"{r['lm_cpu_speedup']:.2f}x", f"{r['speedup']:.2f}x",
         f"{r['first_run']['HFLM']:.2f} / {r['first_run']['HarnessLM']:.2f}", r["agree"],
         fmt(r["results"]["HarnessLM"])]
        for r in payload["rows"]
    ]  # fmt: skip
    header = ["request type", "requests", "model calls: HFLM s", "HarnessLM s", "speed-up", "CPU-time speed-up",
              "simple_evaluate speed-up", "first simple_evaluate s: HFLM / HarnessLM", "results agree",
              "HarnessLM's results"]  # fmt: skip
    return table(header, rows) + ["", f"Measured {provenance(payload)}."]


@renders("lambada_harness_cpu")
def _lambada(payload: dict) -> list[str]:
    rows = [[r["impl"], f"{r['min_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['acc']:.4f}", f"{r['ppl']:.4f}"]
            for r in payload["rows"]]  # fmt: skip
    return table(["implementation", "seconds", "speed-up", "accuracy", "ppl"], rows) + [
        "",
        f"Measured {provenance(payload)}.",
    ]


@renders("pipeline_cpu", "pipeline_cpu_4proc")
def _pipeline(payload: dict) -> list[str]:
    def fmt(value: object, spec: str) -> str:
        return "" if value is None else format(value, spec)

    rows = [
        [r["config"], f"{r['step_s'] * 1e3:.1f}", fmt(r.get("bubble"), ".3f"),
         fmt(r.get("model_step_s") and r["step_s"] / r["model_step_s"], ".2f"),
         f"{r['state_bytes_max_rank'] / 2**20:.2f}", fmt(r.get("states_vs_ddp"), ".2f"), f"{r['last_loss']:.5f}"]
        for r in payload["rows"]
    ]  # fmt: skip
    header = ["config", "step ms", "bubble", "measured / bubble model", "states MiB per rank", "vs DDP", "last loss"]
    return table(header, rows) + ["", f"Measured {provenance(payload)}."]


@renders("distributed_cpu")
def _distributed(payload: dict) -> list[str]:
    rows = [
        [r["strategy"], f"{r['states/rank MiB']:.2f}", f"{r['states x DDP']:.3f}", r["tokens/s"], f"{r['tokens/s x DDP']:.2f}",
         f"{r['final loss']:.5f}"]
        for r in payload["rows"]
    ]  # fmt: skip
    header = ["strategy", "parameters + optimizer state per rank (MiB)", "vs DDP", "tokens/s", "vs DDP", "final loss"]
    return table(header, rows) + ["", f"Measured {provenance(payload)}."]


@renders("process_group_exit_cpu")
def _process_group_exit(payload: dict) -> list[str]:
    rows = [[f"`{r['variant']}`", r["runs"], r["failed"], r["aborts"]] for r in payload["rows"]]
    header = ["gloo group at exit", "2-process runs", "failed", "aborted (SIGABRT)"]
    return table(header, rows) + ["", f"Measured {provenance(payload)}."]


def render(name: str) -> str:
    path = RESULTS / f"{name}.json"
    if name not in RENDERERS:
        raise SystemExit(
            f"README block {name!r}: no renderer in benchmarks/readme_tables.py (known: {sorted(RENDERERS)})"
        )
    if not path.exists():
        raise SystemExit(f"README block {name!r}: {path} is missing; run the benchmark with --json {path}")
    payload = json.loads(path.read_text())
    if "rows" not in payload or "machine" not in payload:
        raise SystemExit(f"{path}: not written by _common.write_json (needs 'rows' and 'machine'); rerun its benchmark")
    return "\n".join(RENDERERS[name](payload)) + "\n"


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the JSON files")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    new = regenerate(text)
    names = [m.group("name") for m in BLOCK.finditer(text)]
    if args.check:
        stale = [n for n in names if render(n) not in text]
        if new != text:
            print(f"README.md result blocks out of date: {stale}; run python benchmarks/readme_tables.py")
            return 1
        print(f"README.md result blocks up to date: {names}")
        return 0
    readme.write_text(new)
    print(f"regenerated {len(names)} block(s): {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
