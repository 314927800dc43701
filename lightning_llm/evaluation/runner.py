"""``evaluate(model, tokenizer, config) -> report``: the HELM-style suite, one switchable part at a time.

Parts (``config[part]["enabled"]``): ``perplexity`` (rolling windows + bits per byte, and perplexity against context
length), ``lambada``, ``multiple_choice`` (accuracy + HELM calibration), ``robustness`` and ``fairness`` (the
multiple-choice task under HELM's perturbations: worst case over original and perturbed input, and the drop from the
unperturbed accuracy), ``efficiency`` (forward tokens/s, latency per example, peak memory).

A part that raises is recorded as ``{"status": "error", "error": ..., "traceback": ...}`` and the others still run.

Report layout: ``{"model": {...}, "config": {...}, "parts": {part: {"status", "seconds", ...results}},
"summary": {"part/metric": float}}``.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_llm.evaluation import tasks
from lightning_llm.evaluation.lm import LanguageModel, load_model
from lightning_llm.evaluation.perturbations import GROUPS, Perturbation

__all__ = ["DEFAULT_CONFIG", "evaluate", "load_config", "merge_config"]

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "batch_size": 16,
    "perplexity": {
        "enabled": True,
        "dataset": "embedded",  # "embedded" | a local .txt file | a Hugging Face dataset name (online)
        "dataset_config": None,
        "split": "test",
        "text_column": "text",
        "max_length": 256,
        "stride": 128,
        "max_chars": 50000,
        "context_lengths": [32, 64, 128, 256],
    },
    "lambada": {
        "enabled": True,
        "path": None,  # None: LAMBADA-style cloze from the embedded corpus; or a .jsonl of {"text"} / a dataset name
        "limit": 200,
        "max_length": 1024,
    },
    "multiple_choice": {
        "enabled": True,
        "path": None,  # None: the embedded sentence-ending task; or a .jsonl {question, choices, answer} / dataset
        "split": "test",
        "dataset_config": None,
        "limit": 200,
        "length_normalize": True,
        "template": "{question}",
        "num_bins": 10,
    },
    "robustness": {"enabled": True, "perturbations": list(GROUPS["robustness"])},
    "fairness": {"enabled": True, "perturbations": list(GROUPS["fairness"])},
    "efficiency": {"enabled": True, "batch_size": 8, "seq_len": 128, "repeats": 3, "latency_examples": 16},
    "plots": True,
}


def merge_config(base: dict[str, Any], override: dict[str, Any] | None, where: str = "config") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; an unknown key is an error naming the valid ones."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in base:
            raise ValueError(f"Unknown evaluation setting {where}.{key}; valid keys: {sorted(base)}.")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge_config(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def load_config(config: str | os.PathLike | dict[str, Any] | None = None) -> dict[str, Any]:
    """The default config, updated from a YAML file or a dict (``{"lambada": {"enabled": False}}``)."""
    if config is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    if isinstance(config, (str, os.PathLike)):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"`config`={str(path)!r} does not exist; see configs/eval/helm.yaml.")
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise TypeError(f"`config` must be a dict, a YAML path or None, got {type(config).__name__}.")
    return merge_config(DEFAULT_CONFIG, config)


# ---------------------------------------------------------------------------------------------------- parts
def _texts(cfg: dict[str, Any]) -> list[str]:
    dataset = cfg["dataset"]
    if dataset == "embedded":
        return tasks.embedded_texts(cfg["split"])
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix in (".txt", ".text", ".md"):
        return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    import datasets

    ds = datasets.load_dataset(str(dataset), cfg.get("dataset_config"), split=cfg["split"])
    return [t for t in ds[cfg.get("text_column", "text")] if t and t.strip()]


def _part_perplexity(lm: LanguageModel, tok: Any, cfg: dict[str, Any], batch_size: int) -> dict[str, Any]:
    texts = _texts(cfg)
    max_length = cfg["max_length"]
    if lm.max_length is not None:
        max_length = min(max_length, lm.max_length)
    stride = min(cfg["stride"] or max_length, max_length)
    out = tasks.text_perplexity(lm, tok, texts, max_length, stride, batch_size, cfg["max_chars"])
    lengths = [n for n in cfg.get("context_lengths") or [] if lm.max_length is None or n <= lm.max_length]
    if lengths:
        curve = tasks.perplexity_vs_context(lm, tok, texts, lengths, batch_size, cfg["max_chars"])
        out["ppl_vs_context"] = {str(k): v for k, v in curve.items()}
    return out


def _lambada_texts(cfg: dict[str, Any]) -> tuple[list[str], str]:
    if cfg["path"] is None:
        return tasks.embedded_cloze_texts(cfg["limit"] or 200), "embedded_cloze"
    from lightning_llm.data.lambada import LambadaDataModule

    dm = LambadaDataModule(path=str(cfg["path"]), max_examples=cfg["limit"])
    return dm.load_texts(), str(cfg["path"])


def _part_lambada(lm: LanguageModel, tok: Any, cfg: dict[str, Any], batch_size: int) -> dict[str, Any]:
    texts, source = _lambada_texts(cfg)
    max_length = min(cfg["max_length"], lm.max_length) if lm.max_length else cfg["max_length"]
    out = tasks.evaluate_lambada(lm, tok, texts, max_length, batch_size)
    out["source"] = source
    return out


def _mc_examples(cfg: dict[str, Any], seed: int) -> tuple[list[tasks.MultipleChoiceExample], str]:
    if cfg["path"] is None:
        return tasks.embedded_multiple_choice(cfg["limit"] or 100, seed=seed), "embedded_sentence_endings"
    examples = tasks.load_multiple_choice(cfg["path"], cfg["split"], cfg["limit"], dataset_config=cfg["dataset_config"])
    return examples, str(cfg["path"])


def _mc(lm: LanguageModel, tok: Any, examples: list, cfg: dict[str, Any], batch_size: int) -> dict[str, Any]:
    return tasks.evaluate_multiple_choice(
        lm,
        tok,
        examples,
        length_normalize=cfg["length_normalize"],
        batch_size=batch_size,
        max_length=lm.max_length,
        template=cfg["template"],
        num_bins=cfg["num_bins"],
    )


def _part_perturbed(
    lm: LanguageModel,
    tok: Any,
    names: list[str],
    examples: list,
    base: dict[str, Any],
    cfg: dict[str, Any],
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """Accuracy under each perturbation, HELM's worst case over the original and all perturbed inputs, the drop."""
    worst = list(base["correct"])
    per: dict[str, Any] = {}
    for name in names:
        p = Perturbation(name, seed)
        perturbed = [tasks.MultipleChoiceExample(p(ex.question), ex.choices, ex.answer) for ex in examples]
        changed = sum(a.question != b.question for a, b in zip(examples, perturbed))
        res = _mc(lm, tok, perturbed, cfg, batch_size)
        worst = [min(a, b) for a, b in zip(worst, res["correct"])]
        per[name] = {
            "acc": sum(res["correct"]) / len(res["correct"]),
            "changed_fraction": changed / len(examples),
            "example": perturbed[0].question[:200],
        }
    acc = sum(base["correct"]) / len(base["correct"])
    worst_acc = sum(worst) / len(worst)
    return {"acc": acc, "worst_case_acc": worst_acc, "drop": acc - worst_acc, "perturbations": per}


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if platform.system() == "Darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    return {"peak_memory_mb": rss_mb, "memory_kind": "process_peak_rss"}


def _part_efficiency(lm: LanguageModel, tok: Any, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    seq_len = cfg["seq_len"] if lm.max_length is None else min(cfg["seq_len"], lm.max_length)
    vocab = tok.vocab_size
    ids = torch.randint(0, vocab, (cfg["batch_size"], seq_len), generator=gen)  # (B, T)
    lm.logits(ids[:1, :8])  # warm-up
    t0, n0 = lm.forward_seconds, lm.forward_tokens
    for _ in range(cfg["repeats"]):
        lm.logits(ids)
    seconds = lm.forward_seconds - t0
    tokens_per_sec = (lm.forward_tokens - n0) / max(seconds, 1e-12)
    examples = tasks.embedded_multiple_choice(cfg["latency_examples"], seed=seed)
    latencies = []
    for ex in examples:
        start = time.perf_counter()
        tasks.evaluate_multiple_choice(lm, tok, [ex], batch_size=len(ex.choices), max_length=lm.max_length)
        latencies.append(time.perf_counter() - start)
    out = {
        "tokens_per_sec": tokens_per_sec,
        "batch_size": cfg["batch_size"],
        "seq_len": seq_len,
        "latency_ms_per_example": 1000 * sum(latencies) / len(latencies),
        "device": str(lm.device),
        "num_parameters": lm.num_parameters(),
    }
    fpt = lm.flops_per_token(seq_len)
    if fpt is not None:
        out["forward_flops_per_sec"] = tokens_per_sec * fpt / 3  # training FLOPs are 3x the forward's
    out.update(_peak_memory(lm.device))
    return out


# ---------------------------------------------------------------------------------------------------- runner
def _run(parts: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    try:
        result = fn()
        parts[name] = {"status": "ok", **result}
        log(f"[evaluate] {name}: ok ({time.perf_counter() - start:.1f}s)")
    except Exception as err:  # noqa: BLE001 - a failed part is reported, never fatal
        parts[name] = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        log(f"[evaluate] {name}: FAILED {type(err).__name__}: {err}")
    parts[name]["seconds"] = time.perf_counter() - start


def _summary(parts: dict[str, Any]) -> dict[str, float]:
    keys = {
        "perplexity": ("ppl", "bits_per_byte"),
        "lambada": ("acc", "ppl"),
        "multiple_choice": ("acc", "acc_norm"),
        "robustness": ("worst_case_acc", "drop"),
        "fairness": ("worst_case_acc", "drop"),
        "efficiency": ("tokens_per_sec", "latency_ms_per_example", "peak_memory_mb"),
    }
    out: dict[str, float] = {}
    for part, names in keys.items():
        res = parts.get(part, {})
        if res.get("status") != "ok":
            continue
        for key in names:
            if key in res:
                out[f"{part}/{key}"] = float(res[key])
        if part == "multiple_choice":
            for key in ("ece_10_bin", "ece_1_bin", "selective_acc@10"):
                out[f"multiple_choice/{key}"] = float(res["calibration"][key])
    return out


def evaluate(
    model: Any,
    tokenizer: Any = None,
    config: str | os.PathLike | dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the suite and return the report (written to ``out_dir`` as report.json, report.md and PNG plots if given).

    Args:
        model: a module (``Transformer``, ``CausalLM``, a Hugging Face causal LM...), a :class:`LanguageModel`, a
            ``.ckpt`` path of ``CausalLM``, or a Hugging Face model directory.
        tokenizer: a :class:`~lightning_llm.data.Tokenizer` or a path; default: the checkpoint's or the HF model's.
        config: a dict or YAML path of settings merged over :data:`DEFAULT_CONFIG`.
        out_dir: where to write the report files.
        device: run on this device (default CUDA when available).
        verbose: print one line per part.
    """
    cfg = load_config(config)
    log = print if verbose else (lambda _msg: None)
    if isinstance(model, LanguageModel):
        lm = model
        if device is not None:
            lm.module.to(device)
    else:
        lm, tokenizer = load_model(model, tokenizer, device)
    if tokenizer is None:
        raise ValueError("`tokenizer` is required for this model: pass a Tokenizer or a tokenizer directory.")
    if isinstance(tokenizer, (str, os.PathLike)):
        from lightning_llm.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer)
    torch.manual_seed(cfg["seed"])
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    bs, seed = cfg["batch_size"], cfg["seed"]
    parts: dict[str, Any] = {}
    if cfg["perplexity"]["enabled"]:
        _run(parts, "perplexity", lambda: _part_perplexity(lm, tokenizer, cfg["perplexity"], bs), log)
    if cfg["lambada"]["enabled"]:
        _run(parts, "lambada", lambda: _part_lambada(lm, tokenizer, cfg["lambada"], bs), log)
    mc_cfg = cfg["multiple_choice"]
    need_mc = mc_cfg["enabled"] or cfg["robustness"]["enabled"] or cfg["fairness"]["enabled"]
    examples: list = []
    if need_mc:

        def run_mc() -> dict[str, Any]:
            items, source = _mc_examples(mc_cfg, seed)
            examples.extend(items)
            return {**_mc(lm, tokenizer, examples, mc_cfg, bs), "source": source}

        _run(parts, "multiple_choice", run_mc, log)
    base = parts.get("multiple_choice", {})
    for group in ("robustness", "fairness"):
        if not cfg[group]["enabled"]:
            continue
        if base.get("status") != "ok":
            parts[group] = {"status": "error", "error": "skipped: the multiple-choice part failed", "seconds": 0.0}
            continue
        names = list(cfg[group]["perturbations"])
        _run(parts, group, lambda n=names: _part_perturbed(lm, tokenizer, n, examples, base, mc_cfg, seed, bs), log)
    if need_mc and not mc_cfg["enabled"]:
        parts.pop("multiple_choice", None)
    if cfg["efficiency"]["enabled"]:
        _run(parts, "efficiency", lambda: _part_efficiency(lm, tokenizer, cfg["efficiency"], seed), log)
    report = {
        "model": {
            "name": lm.name,
            "kind": lm.kind,
            "num_parameters": lm.num_parameters(),
            "max_length": lm.max_length,
            "device": str(lm.device),
            "tokenizer_vocab_size": tokenizer.vocab_size,
        },
        "config": cfg,
        "parts": parts,
        "summary": _summary(parts),
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if out_dir is not None:
        from lightning_llm.evaluation.report import write_report

        paths = write_report(report, out_dir, plots=cfg["plots"])
        report["files"] = {k: str(v) for k, v in paths.items()}
        log(f"[evaluate] report written to {Path(out_dir) / 'report.md'}")
    return report
