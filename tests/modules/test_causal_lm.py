"""CausalLM: loss path, optimisation defaults, checkpoints with the tokenizer, errors, prediction."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_llm.config import TransformerConfig
from lightning_llm.data.text import TextDataModule
from lightning_llm.modules.base import warmup_cosine_lambda
from lightning_llm.modules.causal_lm import CausalLM


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from lightning_llm.data.corpus import embedded_corpus

    path = tmp_path_factory.mktemp("clm") / "corpus.txt"
    path.write_text(embedded_corpus()[:40_000])
    return path


def _datamodule(text_file, **kw) -> TextDataModule:
    args = dict(
        dataset=str(text_file), vocab_size=300, block_size=32, batch_size=4, max_train_blocks=16, max_eval_blocks=4
    )
    args.update(kw)
    return TextDataModule(**args)


def _config(vocab: int, **kw) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=32, **kw)


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=2,
    )
    args.update(kw)
    return L.Trainer(**args)


def test_loss_equals_cross_entropy_of_logits():
    module = CausalLM(_config(97))
    ids = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = -100
    logits = module(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(module.loss({"input_ids": ids, "targets": targets}), expected, rtol=1e-5, atol=1e-6)


def test_warmup_cosine_by_hand():
    fn = warmup_cosine_lambda(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    # warmup: (step + 1) / 4
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # half way through the 10 decay steps: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2)) = 0.55
    assert math.isclose(fn(9), 0.55, rel_tol=1e-12)
    assert math.isclose(fn(14), 0.1, rel_tol=1e-12) and math.isclose(fn(100), 0.1, rel_tol=1e-12)


def test_weight_decay_only_on_matrices(tmp_path, text_file):
    dm = _datamodule(text_file)
    module = CausalLM(_config(dm.vocab_size, norm="layernorm", bias=True), weight_decay=0.3)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    decayed, plain = trainer.optimizers[0].param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(plain["params"]) > 0


def test_fit_lowers_loss_and_checkpoint_restores_model_and_tokenizer(tmp_path, text_file):
    dm = _datamodule(text_file)
    module = CausalLM(_config(dm.vocab_size), learning_rate=3e-3, warmup_steps=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = module.loss(batch).item()
    trainer = _trainer(tmp_path, max_steps=30)
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        after = module.loss(batch).item()
    assert after < before - 0.5, (before, after)
    assert "val/ppl" in trainer.callback_metrics
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    restored = CausalLM.load_from_checkpoint(path)
    restored.eval()
    module.eval()
    torch.testing.assert_close(restored(batch["input_ids"]), module(batch["input_ids"]))
    text = "The tokenizer travels with the checkpoint."
    assert restored.tokenizer.encode(text) == dm.tokenizer.encode(text)
    assert restored.tokenizer.eos_id == dm.tokenizer.eos_id and restored.tokenizer.pad_id == dm.tokenizer.pad_id


def test_vocab_mismatch_is_a_clear_error(tmp_path, text_file):
    dm = _datamodule(text_file)
    module = CausalLM(_config(dm.vocab_size - 10))
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)


def test_vocab_size_argument_fills_the_config_and_refuses_a_conflict():
    """The data's vocabulary (linked by the CLI) is used when the config leaves vocab_size at its default; an
    explicit, different config.vocab_size is an error, not silently replaced (issue 14)."""
    config = TransformerConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)  # vocab_size left at the default
    module = CausalLM(config, vocab_size=77)
    module.configure_model()
    assert module.model.config.vocab_size == 77 and module.model.wte.num_embeddings == 77
    with pytest.raises(ValueError, match=r"`config.vocab_size`=50 but the data's tokenizer has vocab_size=77"):
        CausalLM(_config(50), vocab_size=77)


def test_configure_model_is_idempotent():
    module = CausalLM(_config(40))
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model


def test_predict_generates_text(text_file):
    dm = _datamodule(text_file)
    module = CausalLM(_config(dm.vocab_size), generation={"max_new_tokens": 5, "temperature": 0})
    module.configure_model()
    module.tokenizer = dm.tokenizer
    prompts = ["def ", "The module"]
    batch = {"prompt": prompts, "prompt_ids": [dm.tokenizer.encode(p) for p in prompts]}
    out = module.predict_step(batch, 0)
    assert [o["prompt"] for o in out] == prompts
    assert all(isinstance(o["completion"], str) for o in out)
    # greedy: the same as decoding the model's own greedy continuation
    ref = module.model.generate([batch["prompt_ids"][0]], max_new_tokens=5, temperature=0, eos_id=dm.tokenizer.eos_id)
    tokens = ref.responses[0][ref.response_mask[0].bool()].tolist()
    assert out[0]["completion"] == dm.tokenizer.decode(tokens)
