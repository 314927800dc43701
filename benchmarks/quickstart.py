"""The quickstart as a new user runs it, timed: ``lightning-llm fit --config quickstart`` in an empty folder with an
empty cache (tokenizer training included), then ``lightning-llm evaluate --config eval/helm`` on its checkpoint.

    python benchmarks/quickstart.py --json benchmarks/results/quickstart_cpu.json

Both commands run through the installed console script (``lightning-llm`` beside this interpreter; ``python -m
lightning_llm`` if it is missing) in a fresh temporary folder, with ``LIGHTNING_LLM_CACHE`` pointing at an empty
folder so nothing trained or tokenized earlier is reused. Reported: each command's wall time and exit status, the
closing validation perplexity against the validation split's unigram perplexity (``fit_metrics.json``; the issue's
goal: a ratio below 0.15 within 2.5 minutes on a quiet 2-core machine) and the evaluation report's summary
(``report.json``). Extra arguments after ``--`` go to ``fit`` (e.g. ``-- --trainer.max_steps 50`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_json


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("lightning-llm")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lightning-llm")
    return [found] if found else [sys.executable, "-m", "lightning_llm"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    """``(wall seconds, exit status, the output's tail)`` of one command."""
    start = time.perf_counter()
    proc = subprocess.run([*_cli(), *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the table (rows + machine + commit) here")
    p.add_argument("--no-evaluate", action="store_true", help="time fit only")
    p.add_argument("fit_args", nargs="*", help="extra arguments for fit (after --)")
    args = p.parse_args()
    rows: list[dict] = []
    extra: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp) / "run", Path(tmp) / "cache"
        work.mkdir()
        cache.mkdir()
        env = {**os.environ, "LIGHTNING_LLM_CACHE": str(cache)}
        load_before = os.getloadavg()[0]
        fit = ["fit", "--config", "quickstart", "--trainer.enable_progress_bar", "false", *args.fit_args]
        seconds, status, tail = _run(fit, work, env)
        if status != 0:
            sys.exit(f"fit failed with status {status}:\n{tail}")
        (metrics_file,) = work.glob("logs/quickstart/**/fit_metrics.json")
        metrics = json.loads(metrics_file.read_text())
        val, unigram = metrics["val/ppl"], metrics["data/val_unigram_ppl"]
        rows.append(
            {
                "command": "lightning-llm fit --config quickstart",
                "wall_s": round(seconds, 1),
                "exit_status": status,
                "val_ppl": round(val, 2),
                "unigram_ppl": round(unigram, 2),
                "ratio": round(val / unigram, 4),
            }
        )
        if not args.no_evaluate:
            (ckpt,) = sorted(work.glob("logs/quickstart/**/checkpoints/*.ckpt"))[-1:]
            evaluate = ["evaluate", "--config", "eval/helm", "--model", str(ckpt), "--out", "eval"]
            seconds, status, tail = _run(evaluate, work, env)
            if status != 0:
                sys.exit(f"evaluate failed with status {status}:\n{tail}")
            report = json.loads((work / "eval" / "report.json").read_text())
            rows.append({"command": f"lightning-llm evaluate --config eval/helm --model {ckpt.name}",
                         "wall_s": round(seconds, 1), "exit_status": status})  # fmt: skip
            extra["report_summary"] = report["summary"]
    load_after = os.getloadavg()[0]
    print("| command | wall s | exit status | val ppl | unigram ppl | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['wall_s']} | {r['exit_status']} | {r.get('val_ppl', '')} | "
              f"{r.get('unigram_ppl', '')} | {r.get('ratio', '')} |")  # fmt: skip
    for key, value in extra.get("report_summary", {}).items():
        print(f"{key:<40} {value:.4g}")
    print(f"load average before {load_before:.2f}, after {load_after:.2f}")
    write_json(args.json, rows, load_average_before=load_before, fit_args=args.fit_args, **extra)


if __name__ == "__main__":
    main()
