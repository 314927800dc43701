"""Evaluation tasks against independent references: Hugging Face GPT-2's own loss, naive per-token / per-example
loops, the uncertainty-calibration package HELM uses, and hand-derived values."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.evaluation import LanguageModel, tasks

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "A function returns a value; a generator yields many values, one at a time.",
    "Lists are mutable sequences, and tuples are immutable sequences of objects.",
] * 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def hf_model(tok):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ours(tok):
    from lightning_llm.nn import Transformer

    torch.manual_seed(0)
    return Transformer(
        TransformerConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    ).eval()


def test_rolling_stride_one_equals_naive_loop(ours):
    ids = torch.randint(0, 300, (23,))
    L = 6
    nll, count = tasks.rolling_nll(LanguageModel(ours), ids, max_length=L, stride=1)
    ref = 0.0
    with torch.no_grad():
        for j in range(1, 23):  # token j sees ids[max(0, j - L) : j]
            ctx = ids[max(0, j - L) : j]
            ref -= float(F.log_softmax(ours(ctx[None])[0, -1], -1)[ids[j]])
    assert count == 22
    assert nll == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("stride", [8, 5])
def test_rolling_matches_hf_loss(hf_model, stride):
    ids = torch.randint(0, 300, (40,))
    L = 8
    nll, count = tasks.rolling_nll(LanguageModel(hf_model), ids, max_length=L, stride=stride)
    # Hugging Face "perplexity of fixed-length models": labels -100 on the already-scored part of each window
    ref, prev_end, scored = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, 40, stride):
            end = min(begin + L + 1, 40)  # L inputs predicting up to L targets
            inp = ids[begin:end][None]
            labels = inp.clone()
            n_new = end - max(prev_end, begin + 1)
            labels[0, : inp.shape[1] - n_new] = -100
            loss = hf_model(inp, labels=labels).loss
            ref += float(loss) * n_new
            scored += n_new
            prev_end = end
            if end == 40:
                break
    assert count == scored == 39
    assert nll == pytest.approx(ref, rel=1e-5)


def test_text_perplexity_bits_per_byte(ours, tok):
    out = tasks.text_perplexity(LanguageModel(ours), tok, TEXTS[:2], max_length=16, stride=8)
    text = "\n\n".join(TEXTS[:2])
    assert out["bytes"] == len(text.encode())
    assert out["tokens"] == len(tok.encode(text))  # every text token scored (eos prefix)
    assert out["bits_per_byte"] == pytest.approx(out["nll"] / (math.log(2) * out["bytes"]))
    assert out["ppl"] == pytest.approx(math.exp(out["nll"] / out["tokens"]))


def test_encode_pair_harness_rules(tok):
    ctx, cont = tasks.encode_pair(tok, "the lazy ", "dog")  # trailing space moves to the continuation
    assert tok.decode(cont) == " dog" and tok.decode(ctx) == "the lazy"
    ctx, cont = tasks.encode_pair(tok, "", "dog")
    assert ctx == [tok.eos_id] and cont == tok.encode("dog")


def test_lambada_matches_naive_hf_loop(hf_model, tok):
    texts = [t.rstrip(".") for t in TEXTS[:3]]
    out = tasks.evaluate_lambada(LanguageModel(hf_model), tok, texts, max_length=64)
    logps, hits = [], []
    with torch.no_grad():
        for text in texts:
            words = text.split(" ")
            ctx_ids = tok.encode(" ".join(words[:-1]))
            whole = tok.encode(" ".join(words[:-1]) + " " + words[-1])
            tgt = whole[len(ctx_ids) :]
            logits = hf_model(torch.tensor([whole[:-1]])).logits[0, -len(tgt) :]  # (K, V) predict the target
            logp = torch.log_softmax(logits.double(), -1)  # independent of lightning_llm: float64, unchunked
            logps.append(float(logp[torch.arange(len(tgt)), tgt].sum()))
            hits.append(bool((logp.argmax(-1) == torch.tensor(tgt)).all()))
    assert out["acc"] == pytest.approx(sum(hits) / 3)
    assert out["ppl"] == pytest.approx(math.exp(-sum(logps) / 3), rel=1e-6)


def test_score_continuations_truncates_left(hf_model):
    lm = LanguageModel(hf_model)
    ctx, cont = list(range(1, 30)), [5, 6]
    (s,) = tasks.score_continuations(lm, [(ctx, cont)], max_length=10)
    full = ctx + cont
    inp = torch.tensor([full[-11:-1]])  # harness: (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = hf_model(inp).logits[0, -2:].log_softmax(-1)
    assert s.logprob == pytest.approx(float(logp[0, 5] + logp[1, 6]), rel=1e-5)
    with pytest.raises(ValueError, match="empty continuation"):
        tasks.score_continuations(lm, [([1], [])])


def test_multiple_choice_against_naive_and_calibration_library(ours, tok):
    import calibration as cal

    exs = tasks.embedded_multiple_choice(6, seed=1)
    out = tasks.evaluate_multiple_choice(LanguageModel(ours), tok, exs, length_normalize=False)
    preds, confs = [], []
    with torch.no_grad():
        for ex in exs:
            lps = []
            for choice in ex.choices:
                c, k = tasks.encode_pair(tok, ex.question, " " + choice)
                logits = ours(torch.tensor([(c + k)[:-1]]))
                logp = logits[0, -len(k) :].log_softmax(-1)
                lps.append(float(logp.gather(1, torch.tensor(k)[:, None]).sum()))
            p = torch.tensor(lps).softmax(0)
            preds.append(int(p.argmax()))
            confs.append(float(p.max()))
    correct = [int(p == ex.answer) for p, ex in zip(preds, exs)]
    assert out["acc"] == pytest.approx(sum(correct) / 6)
    assert out["confidence"] == pytest.approx(confs, rel=1e-5)
    c = out["calibration"]
    import numpy as np

    assert c["ece_10_bin"] == pytest.approx(cal.get_ece_em(np.array(confs), np.array(correct), num_bins=10), abs=1e-6)
    assert c["ece_1_bin"] == pytest.approx(abs(sum(confs) / 6 - sum(correct) / 6), abs=1e-6)


def test_embedded_multiple_choice_is_deterministic():
    a, b = tasks.embedded_multiple_choice(20, seed=3), tasks.embedded_multiple_choice(20, seed=3)
    assert a == b and a != tasks.embedded_multiple_choice(20, seed=4)
    for ex in a:
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
        assert len(ex.choices[ex.answer].split()) == 4


def test_load_multiple_choice_jsonl(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "x", "choices": ["a", "b"], "answer": "A"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    exs = tasks.load_multiple_choice(path)
    assert [e.answer for e in exs] == [1, 0]
    path.write_text(json.dumps({"q": "x"}))
    with pytest.raises(ValueError, match="lacks one of the fields"):
        tasks.load_multiple_choice(path)
    with pytest.raises(ValueError, match="answer"):
        tasks.MultipleChoiceExample("q", ["a", "b"], 2)
