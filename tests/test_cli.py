"""Every shipped YAML is a test: each LightningCLI config under configs/ runs through the real CLI with fast_dev_run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
LIGHTNING_CLI_KEYS = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}


def _all_configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def _is_lightning_cli(cfg: dict) -> bool:
    return bool(cfg) and set(cfg) <= LIGHTNING_CLI_KEYS


def _is_multi_process(cfg: dict) -> bool:
    """Presets that launch several processes; tests/parallel runs each of them through the CLI (with stronger checks)."""
    devices = (cfg.get("trainer") or {}).get("devices", 1)
    return isinstance(devices, int) and devices > 1


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_llm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"CLI failed: {args}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A small text file, a LAMBADA-format jsonl and a tokenizer directory, so no config needs ../shared/data."""
    from lightning_llm.data.corpus import embedded_corpus
    from lightning_llm.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("cli_files")
    text = embedded_corpus()[:60_000]
    (root / "corpus.txt").write_text(text)
    passages = [p.strip() for p in text.split("\n") if len(p.split()) > 12][:24]
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    tok = Tokenizer.train_bpe([text], vocab_size=512)
    tok.save(root / "tokenizer")
    return root


def _command(path: Path, cfg: dict, files: Path) -> list[str] | None:
    """The CLI call for one shipped config, with fast_dev_run and local data; None when it needs hardware we lack."""
    trainer = cfg.get("trainer") or {}
    if trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        return None
    stack = [] if ("model" in cfg and "data" in cfg) else ["--config", str(QUICKSTART)]
    args = ["fit", *stack, "--config", str(path), "--trainer.fast_dev_run", "true"]
    merged_data = cfg.get("data") or (_load(QUICKSTART)["data"] if stack else {})
    data_cls = str(merged_data.get("class_path", ""))
    init = merged_data.get("init_args") or {}
    if data_cls.endswith("LambadaDataModule"):
        args[0] = "test"
        args += [
            "--data.init_args.path",
            str(files / "lambada.jsonl"),
            "--data.init_args.tokenizer",
            str(files / "tokenizer"),
        ]
        args += ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32"]
    elif data_cls.endswith("TextDataModule") and str(init.get("dataset", "embedded")).endswith(".txt"):
        args += ["--data.init_args.dataset", str(files / "corpus.txt")]
    return args


# configs/pipeline/ is one chain (each stage reads the previous stage's checkpoint): tests/test_pipeline_chain.py runs it
CLI_CONFIGS = [
    p
    for p in _all_configs()
    if _is_lightning_cli(_load(p))
    and not _is_multi_process(_load(p))
    and "pipeline" not in p.relative_to(CONFIGS).parts
]


def test_configs_are_found():
    names = {p.relative_to(CONFIGS).as_posix() for p in CLI_CONFIGS}
    assert "quickstart.yaml" in names and "model/alibi_small.yaml" in names, names


def test_non_cli_configs_are_exercised_elsewhere():
    """Configs not run here (the evaluation suite's, multi-process presets) must be used by some other test."""
    here = Path(__file__).resolve()
    test_text = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.resolve() != here)
    for path in _all_configs():
        if path not in CLI_CONFIGS:
            assert path.stem in test_text, f"{path} is not run by any test"


@pytest.mark.parametrize("path", CLI_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_runs_through_cli(path: Path, tmp_path: Path, local_files: Path):
    cfg = _load(path)
    args = _command(path, cfg, local_files)
    if args is None:
        pytest.skip(f"{path.name} needs CUDA")
    stage = args[0]
    run_cli(args, cwd=tmp_path)
    metric_files = list(tmp_path.rglob(f"{stage}_metrics.json"))
    assert metric_files, f"no {stage}_metrics.json written under {tmp_path}"
    metrics = json.loads(metric_files[0].read_text())
    assert metrics and all(isinstance(v, (float, str)) for v in metrics.values())
    if stage == "test":
        assert any(k.endswith("lambada_acc") for k in metrics) and any(k.endswith("lambada_ppl") for k in metrics)


def test_unknown_config_key_is_a_clear_error(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_llm",
            "fit",
            "--config",
            str(QUICKSTART),
            "--model.init_args.config.n_layers",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "n_layers" in proc.stderr


def test_quickstart_reports_validation_perplexity(tmp_path: Path):
    """fit writes fit_metrics.json with the closing validation perplexity and the unigram baseline."""
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.val_check_interval",
        "3",
        "--model.init_args.config.n_layer",
        "1",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert "validation perplexity" in proc.stdout
    (path,) = list(tmp_path.rglob("fit_metrics.json"))
    metrics = json.loads(path.read_text())
    assert metrics["val/ppl"] > 1.0 and metrics["data/val_unigram_ppl"] > 1.0
    assert (path.parent / "tokenizer" / "tokenizer.json").exists()

    # predict from the checkpoint with the saved tokenizer: greedy completions written to predictions.jsonl
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    prompts = ["def main", "The module"]
    args = [
        "predict",
        "--config",
        str(QUICKSTART),
        "--model.init_args.config.n_layer",
        "1",
        "--model.init_args.generation",
        '{"max_new_tokens": 4, "temperature": 0}',
        "--data",
        "lightning_llm.data.PromptDataModule",
        "--data.init_args.prompts",
        json.dumps(prompts),
        "--data.init_args.tokenizer",
        str(path.parent / "tokenizer"),
        "--ckpt_path",
        str(ckpt),
    ]
    run_cli(args, cwd=tmp_path)
    (pred_path,) = list(tmp_path.rglob("predictions.jsonl"))
    rows = [json.loads(line) for line in pred_path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["completion"], str) for r in rows)


def test_python_dash_m_and_console_script_share_main():
    from lightning_llm import cli

    assert callable(cli.main)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_llm", "--help"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "fit" in proc.stdout and "predict" in proc.stdout
