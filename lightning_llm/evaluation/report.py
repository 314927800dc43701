"""Write an evaluation report: ``report.json``, ``report.md`` (the table a person reads) and PNG plots.

Plots (matplotlib, headless ``Figure`` objects, no pyplot state): ``reliability_diagram.png`` (multiple-choice
confidence vs accuracy in HELM's equal-mass bins), ``perturbation_accuracy.png`` (accuracy per perturbation and the
worst case) and ``ppl_vs_context.png`` (perplexity against the evaluation window length).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_perplexity_vs_context", "plot_perturbation_accuracy", "render_markdown", "write_report"]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    # a table cell: a `|` would end it and a line break the row (a chat template has both); report.json keeps the text
    return " ".join(str(value).replace("|", "\\|").split("\n"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    return obj


def render_markdown(report: dict[str, Any], plots: dict[str, Path] | None = None) -> str:
    """The Markdown report: model facts, the summary table, one section per part (errors included)."""
    m = report.get("model", {})
    lines = [
        "# Evaluation report",
        "",
        f"Model `{m.get('name')}` ({m.get('kind')}, {_fmt(m.get('num_parameters'))} parameters, device "
        f"{m.get('device')}, max length {m.get('max_length') or 'unbounded'}).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report.get("summary", {}).items()]
    for name, part in report.get("parts", {}).items():
        lines += ["", f"## {name}", ""]
        if part.get("status") != "ok":
            lines.append(f"**failed**: `{part.get('error')}`")
            continue
        rows = []
        for key, value in part.items():
            if key in ("status", "traceback", "confidence", "correct", "predicted", "examples"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, dict):
                        rows += [(f"{key}/{sub}/{k}", x) for k, x in v.items()]
                    else:
                        rows.append((f"{key}/{sub}", v))
            else:
                rows.append((key, value))
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path.name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def plot_perturbation_accuracy(parts: dict[str, Any]):
    """Bar chart: unperturbed accuracy, accuracy per perturbation, worst case per group."""
    from matplotlib.figure import Figure

    labels, values, colors = [], [], []
    base = parts.get("multiple_choice", {})
    if base.get("status") == "ok":
        labels.append("original")
        values.append(sum(base["correct"]) / len(base["correct"]))
        colors.append("tab:blue")
    for group, color in (("robustness", "tab:orange"), ("fairness", "tab:green")):
        part = parts.get(group, {})
        if part.get("status") != "ok":
            continue
        for name, res in part["perturbations"].items():
            labels.append(name)
            values.append(res["acc"])
            colors.append(color)
        labels.append(f"{group}\nworst case")
        values.append(part["worst_case_acc"])
        colors.append("tab:red")
    fig = Figure(figsize=(max(4.0, 1.1 * len(labels)), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Multiple-choice accuracy under perturbation")
    fig.tight_layout()
    return fig


def plot_perplexity_vs_context(curves: dict[str, dict[Any, float]], train_length: int | None = None):
    """Line plot of perplexity against evaluation length, one line per model (``{label: {length: ppl}}``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, curve in curves.items():
        xs = sorted(int(k) for k in curve)
        ax.plot(xs, [curve[k] if k in curve else curve[str(k)] for k in xs], marker="o", label=label)
    if train_length:
        ax.axvline(train_length, color="gray", linestyle="--", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.set_title("Perplexity vs context length")
    fig.tight_layout()
    return fig


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md and (``plots``) the PNGs into ``out_dir``; return the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    pngs: dict[str, Path] = {}
    parts = report.get("parts", {})
    if plots:
        figures = {}
        mc = parts.get("multiple_choice", {})
        if mc.get("status") == "ok":
            import torch

            from lightning_llm.metrics.plot import plot_reliability_diagram

            figures["reliability_diagram"] = plot_reliability_diagram(
                torch.tensor(mc["confidence"], dtype=torch.float64),
                torch.tensor(mc["correct"]),
                num_bins=report.get("config", {}).get("multiple_choice", {}).get("num_bins", 10),
                binning="equal_mass",
            )
        if any(parts.get(g, {}).get("status") == "ok" for g in ("robustness", "fairness")):
            figures["perturbation_accuracy"] = plot_perturbation_accuracy(parts)
        ppl = parts.get("perplexity", {})
        if ppl.get("status") == "ok" and ppl.get("ppl_vs_context"):
            figures["ppl_vs_context"] = plot_perplexity_vs_context({report["model"]["name"]: ppl["ppl_vs_context"]})
        for name, fig in figures.items():
            pngs[name] = out / f"{name}.png"
            fig.savefig(pngs[name], dpi=100)
    paths.update(pngs)
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(_jsonable(report), indent=2) + "\n", encoding="utf-8")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(render_markdown(report, pngs), encoding="utf-8")
    return paths
