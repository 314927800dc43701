"""SFT: packed rows give each example its own loss; the loss is TRL's masked token mean; training learns; the
quickstart preset runs through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_llm.config import TransformerConfig
from lightning_llm.data.preference import ChatTemplate
from lightning_llm.data.sft import (
    INSTRUCTION_CHARS,
    SFTDataModule,
    collate_sft,
    instruction_examples,
    pack_examples,
    tokenize_sft_example,
)
from lightning_llm.data.synthetic import char_tokenizer
from lightning_llm.modules.sft import SFT
from lightning_llm.ops import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned"])
def test_packed_row_gives_each_example_its_loss(pos_encoding):
    tok = char_tokenizer(chars=INSTRUCTION_CHARS)
    cfg = TransformerConfig(
        vocab_size=tok.vocab_size,
        block_size=128,
        n_layer=2,
        n_head=4,
        n_embd=32,
        pos_encoding=pos_encoding,
        attention_backend="sdpa",
    )
    module = SFT(config=cfg)
    module.configure_model()
    module.eval()
    items = [tokenize_sft_example(r, tok, ChatTemplate()) for r in instruction_examples(6, 5)]
    rows = pack_examples(items, 128)
    assert any(len(row) > 1 for row in rows)
    packed = collate_sft(rows, tok.pad_id)
    with torch.no_grad():
        lp_packed, _ = module.token_logprobs(packed)  # (R, T)
        for r, row in enumerate(rows):
            start = 0
            for ex in row:
                alone = collate_sft([ex], tok.pad_id)
                lp_alone, _ = module.token_logprobs(alone)
                n = len(ex["input_ids"])
                torch.testing.assert_close(lp_packed[r, start : start + n], lp_alone[0, :n], rtol=1e-5, atol=1e-5)
                start += n


def test_loss_is_the_masked_token_mean():
    """The training loss equals cross-entropy of shifted logits over scored labels (transformers' causal-LM loss)."""
    tok = char_tokenizer(chars=INSTRUCTION_CHARS)
    module = SFT(config=TransformerConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    module.configure_model()
    items = [tokenize_sft_example(r, tok, ChatTemplate()) for r in instruction_examples(4, 2)]
    batch = collate_sft(items, tok.pad_id)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for i, it in enumerate(items):
        labels[i, : len(it["labels"])] = torch.tensor(it["labels"])
    logits = module(batch["input_ids"], batch["attention_mask"])
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(module.loss(batch), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [None, {"r": 2, "alpha": 4, "target_modules": "all-linear"}])
def test_scored_rows_loss_and_gradients_equal_the_full_head(lora):
    """The training loss projects only scored positions, in chunks: the same loss and gradients as the model's own
    loss over every position (padded vocabulary rows excluded), for full fine-tuning and LoRA."""
    from lightning_llm.nn.heads import chunked_cross_entropy

    tok = char_tokenizer(chars=INSTRUCTION_CHARS)
    cfg = TransformerConfig(
        vocab_size=tok.vocab_size, padded_vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=16
    )
    torch.manual_seed(0)
    module = SFT(config=cfg, lora=lora)
    module.configure_model()
    items = [tokenize_sft_example(r, tok, ChatTemplate()) for r in instruction_examples(4, 2)]
    batch = collate_sft(items, tok.pad_id)
    assert 0 < int((batch["targets"] != IGNORE_INDEX).sum()) < batch["targets"].numel()
    loss = module.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad()
    model = module.model
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
    ref = chunked_cross_entropy(
        hidden.flatten(0, 1), model.output_weight, batch["targets"].flatten(), vocab_size=cfg.vocab_size
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    empty = {**batch, "targets": torch.full_like(batch["targets"], IGNORE_INDEX)}
    assert float(module.loss(empty)) == 0.0  # nothing scored: 0, not nan


def test_default_optimizer_is_fused_adamw():
    module = SFT(config=TransformerConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0] and opt.defaults["lr"] == 2e-5
    n = sum(p.numel() for p in module.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n


def test_sft_learns_held_out_prompts(tmp_path):
    L.seed_everything(0)
    dm = SFTDataModule(num_train=512, num_val=64, max_length=48, batch_size=32)
    cfg = TransformerConfig(block_size=48, n_layer=2, n_head=4, n_embd=64)
    module = SFT(config=cfg, vocab_size=dm.vocab_size, learning_rate=3e-3, warmup_steps=5)
    trainer = L.Trainer(
        max_steps=60,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=60,
        check_val_every_n_epoch=None,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert float(m["val/loss"]) < 0.7 * float(m["baseline/val_loss"])
    assert float(m["val/token_accuracy"]) > float(m["baseline/val_token_accuracy"]) + 0.2


def test_quickstart_preset_runs_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lightning_llm",
        "fit",
        "--config",
        "sft/sft_quickstart",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--data.init_args.num_train",
        "128",
        "--data.init_args.num_val",
        "32",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(next(tmp_path.rglob("fit_metrics.json")).read_text())
    assert {"val/loss", "val/token_accuracy", "baseline/val_loss", "baseline/val_token_accuracy"} <= set(metrics)


def test_right_padded_rows_train_without_a_mask():
    """Right padding under causal attention: no real token sees a pad and positions are indices, so the training
    forward drops the mask (no (B, 1, T, T) mask per layer); left padding, packing or explicit positions keep it.
    The loss and gradients equal the masked forward's (the model's own loss with the mask, over the same rows)."""
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert SFT._training_inputs({"attention_mask": right}) == {}
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert set(SFT._training_inputs({"attention_mask": left})) == {"attention_mask"}
    packed = {"attention_mask": right, "position_ids": torch.zeros(3, 4, dtype=torch.long)}
    assert set(SFT._training_inputs(packed)) == {"attention_mask", "position_ids"}

    tok = char_tokenizer(chars=INSTRUCTION_CHARS)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    module = SFT(config=cfg)
    module.configure_model()
    items = [tokenize_sft_example(r, tok, ChatTemplate()) for r in instruction_examples(3, 5)]
    batch = collate_sft(items, tok.pad_id)
    assert not bool(batch["attention_mask"].all())  # rows of different lengths: there are pads
    loss = module.loss(batch)
    grads = torch.autograd.grad(loss, list(module.model.parameters()))
    masked = module.model(batch["input_ids"], targets=batch["targets"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(loss, masked, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(masked, list(module.model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
