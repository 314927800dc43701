"""``python -m lightning_llm.evaluation --checkpoint PATH | --hf PATH [--config configs/eval/helm.yaml] --out DIR``.

Evaluates a ``CausalLM`` checkpoint of ours or a Hugging Face causal LM directory and writes report.json, report.md
and PNG plots into ``--out``. ``--set part.key=value`` overrides one setting (YAML syntax for the value).
"""

from __future__ import annotations

import argparse
import sys

from lightning_llm.evaluation.runner import evaluate, load_config, merge_config


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _apply_sets(cfg: dict, sets: list[str]) -> dict:
    import yaml

    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set expects key.sub=value, got {item!r}")
        key, value = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = yaml.safe_load(value)
        cfg = merge_config(cfg, nested)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lightning_llm.evaluation", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a CausalLM .ckpt file")
    src.add_argument("--hf", help="a Hugging Face causal LM directory (or hub name when online)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's / model's)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML settings merged over the defaults, repeatable (configs/eval/)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lambada.limit=50"
    )
    parser.add_argument("--out", required=True, help="output directory for report.json / report.md / plots")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    args = parser.parse_args(argv)
    cfg = load_config(None)
    for path in args.config:
        cfg = merge_config(cfg, _read_yaml(path))
    cfg = _apply_sets(cfg, args.set)
    from lightning_llm.evaluation.lm import load_model

    lm, tok = load_model(args.checkpoint or args.hf, args.tokenizer, args.device, hf=args.hf is not None)
    report = evaluate(lm, tok, cfg, out_dir=args.out)
    width = max((len(k) for k in report["summary"]), default=0)
    for key, value in report["summary"].items():
        print(f"{key:<{width}}  {value:.4g}")
    failed = [k for k, v in report["parts"].items() if v.get("status") != "ok"]
    if failed:
        print(f"[evaluate] failed parts: {failed} (see report.md)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
