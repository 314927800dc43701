"""A tiny random Hugging Face Llama directory with a BPE tokenizer trained here, offline: the starting point of the
LoRA tests and of the pipeline chain (``save_pretrained`` + ``Tokenizer.save`` into one folder)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(directory: str | Path, texts: list[str], vocab_size: int, hidden: int):
    """Train a ``vocab_size`` BPE on ``texts``, save it and a random 2-layer ``LlamaForCausalLM`` of width ``hidden``
    (4 heads, 2 KV heads, MLP width 2 x hidden, 128 positions, seed 0) to ``directory``; returns the tokenizer."""
    import transformers

    from lightning_llm.data.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(texts, vocab_size=vocab_size)
    tok.save(directory)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return tok
