"""Fixtures for the LAMBADA parity tests: a tiny, briefly trained GPT-2 and its byte-level BPE, saved offline.

Everything is built here, in seconds, with no download: the tokenizer is :meth:`Tokenizer.train_bpe` on the
embedded corpus plus the synthetic passages, the model a 2-layer width-64 ``transformers.GPT2LMHeadModel`` trained
for a few hundred steps on passages made of a few fixed sentences, so that the last word of many synthetic
passages is predictable (accuracy strictly between 0 and 1) while others are not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

N_POSITIONS = 96  # the model's context length; some passages are longer and get left-truncated

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "return the value of the named attribute of object",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the rain in spain falls mainly on the plain",
    "open the file and read every line into memory",
    "the early bird catches the worm",
    "raise an exception when the iterator is exhausted",
    "every good boy deserves fudge",
]
EDGE_CASES = [
    "the early bird catches the  worm",  # double space: the context's trailing space moves to the continuation
    "Alone",  # no space at all: empty context, scored after the prefix token
    "She whispered \u201chello\u201d to the quick brown fox",  # non-ASCII
    "a stitch in time\nsaves nine",  # a newline inside the context
    "the last word spans two\nlines",  # a newline inside the target
    " ".join(SENTENCES * 2) + " the quick brown fox jumps over the lazy dog",  # > N_POSITIONS tokens: truncated
]


def synthetic_passages(n: int, seed: int = 0) -> list[str]:
    """``n`` LAMBADA-format passages: 1-3 random fixed sentences, then one more, whose last word is the target.
    Every fourth passage ends in a random word instead (unpredictable)."""
    rng = random.Random(seed)
    words = sorted({w for s in SENTENCES for w in s.split()})
    out = []
    for i in range(n):
        text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 3))) + " " + rng.choice(SENTENCES)
        if i % 4 == 3:
            text = text.rsplit(" ", 1)[0] + " " + rng.choice(words)
        out.append(text)
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def build_tiny_gpt2(directory: Path, steps: int = 120, batch_size: int = 8, seq_len: int = 64) -> Path:
    """Trains the tokenizer and the tiny GPT-2, saves both to ``directory`` (``save_pretrained`` + ``Tokenizer.save``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_llm.data.corpus import embedded_documents
    from lightning_llm.data.tokenizer import Tokenizer

    train_texts = synthetic_passages(400, seed=1)
    tok = Tokenizer.train_bpe(embedded_documents()[:200] + train_texts, vocab_size=512)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=N_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    stream = torch.tensor([i for t in train_texts for i in [*tok.encode(t), tok.eos_id]], dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and immune to a loaded machine's stalls
    try:
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=g)
            batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (batch_size, seq_len)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def synthetic_jsonl(tmp_path_factory) -> Path:
    texts = synthetic_passages(60, seed=2) + EDGE_CASES
    return write_jsonl(tmp_path_factory.mktemp("lambada_synthetic") / "lambada.jsonl", texts)


def add_bos_template(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose tokenizer adds ``<s>`` in front of every encoding (a Llama-style template)."""
    import tokenizers
    from tokenizers import processors
    from transformers import GPT2LMHeadModel

    dst.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]),
        ]
    )
    tok.save(str(dst / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s>"}))
    model = GPT2LMHeadModel.from_pretrained(src)
    model.resize_token_embeddings(bos + 1)
    model.config.bos_token_id = bos
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def tiny_bos_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    return add_bos_template(tiny_hf_dir, tmp_path_factory.mktemp("tiny_gpt2_bos"))
