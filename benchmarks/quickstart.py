"""The quickstart as a new user runs it, timed: ``lightning-llm fit --config quickstart`` in an empty folder with an
empty cache (tokenizer training included), then ``lightning-llm evaluate --config eval/helm`` on its checkpoint.

    python benchmarks/quickstart.py --json benchmarks/results/quickstart_cpu.json

Both commands run through the installed console script (``lightning-llm`` beside this interpreter; ``python -m
lightning_llm`` if it is missing) in a fresh temporary folder, with ``LIGHTNING_LLM_CACHE`` pointing at an empty
folder so nothing trained or tokenized earlier is reused. Reported: each command's wall time and exit status, the
closing validation perplexity against the validation split's unigram perplexity (``fit_metrics.json``; the issue's
goal: a ratio below 0.15 within 2.5 minutes on a quiet 2-core machine) and the evaluation report's summary
(``report.json``). Extra arguments after ``--`` go to ``fit`` (a smoke run: ``-- --trainer.max_steps 20``; the
CLI's ``FinalCheckpoint`` saves the last step for ``evaluate`` to read when no validation ran there).

``--recipe alignment`` runs the post-training quickstarts the same way, each in its own empty folder with its own empty
cache: ``rlhf/reward_quickstart``, ``rlhf/dpo_quickstart``, ``rlhf/ppo_quickstart``, ``rlhf/grpo_quickstart``,
``rlhf/rloo_quickstart`` and ``sft/sft_quickstart``, and reports what each shows, read from its ``fit_metrics.json``
and ``metrics.csv``: held-out accuracy for the reward model and DPO; for PPO / GRPO / RLOO the mean training reward over
the first and the last 10% of the rollouts (rows logged at every step) and the largest KL to the reference; for SFT
the held-out loss and token accuracy against the untrained model's (``baseline/*``, measured before the first step).

    python benchmarks/quickstart.py --recipe alignment --json benchmarks/results/alignment_cpu.json

``--recipe monitoring`` runs the quickstart with every monitoring callback stacked on (``--config
callbacks/monitoring``, 40 steps, validation every 20) and reports the monitored curves at each validation from
``metrics.csv``, with the number of columns the log holds.

    python benchmarks/quickstart.py --recipe monitoring --json benchmarks/results/monitoring_cpu.json
"""

from __future__ import annotations

import argparse
import csv
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


def _workspace(root: Path, name: str) -> tuple[Path, dict[str, str]]:
    """An empty folder ``root / name`` to run in and the environment of a fresh, empty cache beside it."""
    work, cache = root / name, root / f"{name}_cache"
    work.mkdir()
    cache.mkdir()
    return work, {**os.environ, "LIGHTNING_LLM_CACHE": str(cache)}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """``(wall seconds, exit status)`` of one ``lightning-llm`` command; a failure ends the benchmark with its output."""
    start = time.perf_counter()
    proc = subprocess.run([*_cli(), *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lightning-llm {' '.join(args)} failed with status {proc.returncode}:\n"
                 f"{(proc.stdout + proc.stderr)[-3000:]}")  # fmt: skip
    return seconds, proc.returncode


#: the post-training quickstarts (``--recipe alignment``): config -> how to summarise its run
ALIGNMENT = {
    "rlhf/reward_quickstart": ("pairwise", None, None),
    "rlhf/dpo_quickstart": ("pairwise", None, None),
    "rlhf/ppo_quickstart": ("online", "train/reward_mean", "train/kl"),
    "rlhf/grpo_quickstart": ("online", "train/reward", None),
    "rlhf/rloo_quickstart": ("online", "train/reward", "train/kl"),
    "sft/sft_quickstart": ("sft", None, None),
}


def _column(csv_path: Path, key: str) -> list[float]:
    """The logged values of one ``metrics.csv`` column, in step order (rows without it skipped)."""
    with csv_path.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _summarise(kind: str, metrics: dict, csv_path: Path, reward_key: str | None, kl_key: str | None) -> dict:
    """What a post-training quickstart shows: ``{"result": text, **the numbers in it}``."""
    if kind == "pairwise":
        acc, loss = metrics["val/accuracy"], metrics["val/loss"]
        return {"val_accuracy": acc, "val_loss": loss,
                "result": f"held-out pairwise accuracy {acc:.3g} (val loss {loss:.3g})"}  # fmt: skip
    if kind == "sft":
        loss, acc = metrics["val/loss"], metrics["val/token_accuracy"]
        base_loss, base_acc = metrics["baseline/val_loss"], metrics["baseline/val_token_accuracy"]
        return {
            "val_loss": loss, "val_token_accuracy": acc, "baseline_val_loss": base_loss,
            "baseline_val_token_accuracy": base_acc,
            "result": f"held-out completion loss {loss:.3g} (untrained {base_loss:.3g}), token accuracy {acc:.3g} "
            f"(untrained {base_acc:.3g})",
        }  # fmt: skip
    rewards = _column(csv_path, reward_key)
    tenth = max(1, len(rewards) // 10)
    first, last = sum(rewards[:tenth]) / tenth, sum(rewards[-tenth:]) / tenth
    out = {"rollouts": len(rewards), "reward_first_10pct": first, "reward_last_10pct": last}
    text = f"mean reward {first:.3g} over the first 10% of {len(rewards)} rollouts, {last:.3g} over the last 10%"
    if kl_key is not None:
        kl = max(_column(csv_path, kl_key))
        out["max_kl"] = kl
        text += f"; KL to the reference at most {kl:.3g} nats per sequence"
    return {**out, "result": text}


#: the curves ``--recipe monitoring`` reports at each validation
MONITORED = ("val/ppl", "lambada/acc", "calibration/ece", "embedding/isotropy", "embedding/static/analogy_acc")


def monitoring(root: Path, fit_args: list[str]) -> tuple[dict, list[dict]]:
    """The quickstart with the monitoring preset: ``(the command's row, one row per validation)``."""
    work, env = _workspace(root, "run")
    shown = ["fit", "--config", "quickstart", "--config", "callbacks/monitoring", "--trainer.max_steps", "40",
             "--trainer.val_check_interval", "20", *fit_args]  # fmt: skip
    seconds, status = _run([*shown, "--trainer.enable_progress_bar", "false"], work, env)
    (csv_path,) = work.glob("logs/**/metrics.csv")
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        logged = list(reader)
        columns = reader.fieldnames or []
    # one round per validation: Lightning writes val/* at the step before the callbacks' (global_step - 1 vs
    # global_step) and repeats the last validation's row at the end of fit; the callbacks' rows follow their round
    # (throughput is left out: logged on its own cadence, it belongs to no validation)
    rounds: list[dict] = []
    for r in logged:
        if r.get("val/ppl") and not (rounds and float(r["val/ppl"]) == rounds[-1]["val/ppl"]):
            rounds.append({"step": 0})
        if not rounds:
            continue
        if r.get("lambada/acc"):  # the optimizer steps done (the callbacks log at global_step)
            rounds[-1]["step"] = int(r["step"])
        for k in MONITORED:
            if r.get(k) and k not in rounds[-1]:
                rounds[-1][k] = float(r[k])
    command = {"command": "lightning-llm " + " ".join(shown), "wall_s": round(seconds, 1), "exit_status": status,
               "columns": len(columns)}  # fmt: skip
    return command, rounds


def alignment(root: Path, fit_args: list[str]) -> list[dict]:
    """Run every post-training quickstart in its own empty folder and cache; one row each."""
    rows = []
    for config, (kind, reward_key, kl_key) in ALIGNMENT.items():
        work, env = _workspace(root, config.replace("/", "_"))
        args = ["fit", "--config", config, "--trainer.enable_progress_bar", "false", *fit_args]
        seconds, status = _run(args, work, env)
        (metrics_file,) = work.glob("logs/**/fit_metrics.json")
        metrics = json.loads(metrics_file.read_text())
        summary = _summarise(kind, metrics, metrics_file.with_name("metrics.csv"), reward_key, kl_key)
        rows.append({"command": f"lightning-llm fit --config {config}", "wall_s": round(seconds, 1),
                     "exit_status": status, **summary})  # fmt: skip
        print(f"| {rows[-1]['command']} | {rows[-1]['wall_s']} | {status} | {summary['result']} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the table (rows + machine + commit) here")
    p.add_argument("--no-evaluate", action="store_true", help="time fit only")
    p.add_argument(
        "--recipe", choices=("quickstart", "alignment", "monitoring"), default="quickstart", help="what to run (above)"
    )
    p.add_argument("fit_args", nargs="*", help="extra arguments for fit (after --)")
    args = p.parse_args()
    rows: list[dict] = []
    extra: dict = {}
    if args.recipe == "alignment":
        load_before = os.getloadavg()[0]
        print("| command | wall s | exit status | result |")
        print("|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            rows = alignment(Path(tmp), args.fit_args)
        print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
        write_json(args.json, rows, load_average_before=load_before, fit_args=args.fit_args)
        return
    if args.recipe == "monitoring":
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            command, rows = monitoring(Path(tmp), args.fit_args)
        print(f"{command['command']}: {command['wall_s']} s, exit status {command['exit_status']}, "
              f"{command['columns']} columns in metrics.csv")  # fmt: skip
        for r in rows:
            print("  ".join(f"{k} {v:.4g}" for k, v in r.items()))
        print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
        write_json(args.json, rows, run=command, load_average_before=load_before, fit_args=args.fit_args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work, env = _workspace(Path(tmp), "run")
        load_before = os.getloadavg()[0]
        fit = ["fit", "--config", "quickstart", "--trainer.enable_progress_bar", "false", *args.fit_args]
        seconds, status = _run(fit, work, env)
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
            seconds, status = _run(evaluate, work, env)
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
