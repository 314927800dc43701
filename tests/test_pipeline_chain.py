"""The post-training chain of ``configs/pipeline/`` through the real CLI, at tiny size, from a Hugging Face model
built here (``save_pretrained`` of a random Llama with a BPE tokenizer trained here): SFT with LoRA
(``1_sft_lora``) -> reward model (``2_reward``) -> PPO (``3_ppo``; DPO with LoRA as the alternative,
``3_dpo_lora``) -> ``4_evaluate`` -> ``5_export``. Each stage reads the previous stage's checkpoint path, and each
asserts something real."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_llama import save_tiny_llama  # noqa: E402


def build_base(directory: Path) -> None:
    """The README's first step: a tiny random Llama and a BPE tokenizer trained on the task texts, saved offline."""
    from lightning_llm.data.sft import instruction_examples
    from lightning_llm.data.synthetic import synthetic_preference_examples

    texts = [
        f"user: {e['prompt'][0]['content']}\nassistant: {e['completion'][0]['content']}\n"
        for e in instruction_examples(500, 0)
    ]
    texts += [e["prompt"] + e["chosen"] for e in synthetic_preference_examples(500, 0)]
    save_tiny_llama(directory, texts, vocab_size=320, hidden=64)


def cli(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_llm", *args, "--trainer.enable_progress_bar", "false"]
        if args[0] == "fit"
        else [sys.executable, "-m", "lightning_llm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def fit_metrics(cwd: Path, name: str) -> dict:
    (path,) = list((cwd / "runs/pipeline/logs" / name).rglob("fit_metrics.json"))
    return json.loads(path.read_text())


def csv_column(cwd: Path, name: str, column: str) -> list[float]:
    (path,) = list((cwd / "runs/pipeline/logs" / name).rglob("metrics.csv"))
    with path.open() as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column) not in (None, "")]


@pytest.mark.slow
def test_pipeline_chain(tmp_path):
    from lightning_llm.checkpoint import load_checkpoint
    from lightning_llm.loading import load_pretrained

    build_base(tmp_path / "runs/pipeline/base")

    # 1. SFT with LoRA: loss below its start; the checkpoint holds only adapters + the base reference
    cli(
        tmp_path,
        "fit",
        "--config",
        "pipeline/1_sft_lora",
        "--trainer.max_steps",
        "80",
        "--trainer.val_check_interval",
        "40",
        "--data.init_args.num_train",
        "640",
        "--data.init_args.num_val",
        "64",
    )
    m = fit_metrics(tmp_path, "sft")
    assert m["val/loss"] < m["baseline/val_loss"] - 0.3, m
    assert m["val/token_accuracy"] > m["baseline/val_token_accuracy"] + 0.1, m
    sft = load_checkpoint(tmp_path / "runs/pipeline/sft/last.ckpt")
    assert all(".lora_" in k for k in sft["state_dict"]) and sft["lora"]["base"].endswith("runs/pipeline/base")

    # 2. reward model from the SFT model: held-out pairwise accuracy well above chance
    cli(
        tmp_path,
        "fit",
        "--config",
        "pipeline/2_reward",
        "--trainer.max_steps",
        "120",
        "--trainer.val_check_interval",
        "60",
        "--data.init_args.num_train",
        "1024",
    )
    m = fit_metrics(tmp_path, "reward")
    assert m["val/accuracy"] > 0.65, m

    # 3. PPO from the SFT model against the reward model: the reward goes up, the KL stays bounded
    cli(tmp_path, "fit", "--config", "pipeline/3_ppo", "--data.init_args.num_train", "640")
    rewards = csv_column(tmp_path, "ppo", "train/reward_mean")
    kls = csv_column(tmp_path, "ppo", "train/kl")
    k = max(1, len(rewards) // 4)
    assert sum(rewards[-k:]) / k > sum(rewards[:k]) / k, rewards
    assert all(math.isfinite(v) and v < 10.0 for v in kls), kls

    # 3'. DPO with LoRA (the alternative): adapter-only checkpoint, preference accuracy above chance
    cli(
        tmp_path,
        "fit",
        "--config",
        "pipeline/3_dpo_lora",
        "--trainer.max_steps",
        "60",
        "--trainer.val_check_interval",
        "30",
        "--data.init_args.num_train",
        "1024",
    )
    m = fit_metrics(tmp_path, "dpo")
    assert m["val/accuracy"] > 0.5, m
    assert all(".lora_" in k for k in load_checkpoint(tmp_path / "runs/pipeline/dpo/last.ckpt")["state_dict"])

    # 4. evaluate the PPO model
    cli(tmp_path, "evaluate", "--config", "pipeline/4_evaluate")
    report = json.loads((tmp_path / "runs/pipeline/eval/report.json").read_text())
    assert report["parts"] and all(p.get("status", "ok") == "ok" for p in report["parts"].values()), report["parts"]

    # 5. export: Hugging Face loads the PPO model with our logits; the DPO LoRA model as base + peft adapter
    cli(tmp_path, "export", "--config", "pipeline/5_export")
    ours, _ = load_pretrained(tmp_path / "runs/pipeline/ppo/last.ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs/pipeline/hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)
    cli(tmp_path, "export", "--checkpoint", "runs/pipeline/dpo/last.ckpt", "--output", "runs/pipeline/hf_dpo")
    from lightning_llm.loading import load_pretrained

    dpo_model, _ = load_pretrained(tmp_path / "runs/pipeline/dpo/last.ckpt")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs/pipeline/hf_dpo").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "runs/pipeline/hf_dpo/adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, dpo_model(ids), rtol=0, atol=1e-4)
