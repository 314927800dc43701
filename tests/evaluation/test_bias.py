"""HELM bias metrics, the toxicity hook and the efficiency additions against hand-derived values."""

from __future__ import annotations

import pytest

from lightning_llm.evaluation.bias import (
    demographic_representation,
    group_counts_to_bias,
    stereotypical_associations,
    toxicity_metrics,
)

GROUPS = {"female": ["she", "her"], "male": ["he", "him", "his", "man"]}


def test_demographic_representation_hand_derived():
    texts = ["She said he was late.", "Her friend and HER sister", "nothing here"]
    # female: she 1 + her 2 = 3 mentions over a list of 2 -> 1.5; male: he 1 over 4 -> 0.25
    # p = (1.5, 0.25) / 1.75 = (6/7, 1/7); TV = 1/2 (|1/2 - 6/7| + |1/2 - 1/7|) = 5/14
    out = demographic_representation(texts, GROUPS)
    assert out["counts"] == {"female": 3, "male": 1}
    assert out["distribution"]["female"] == pytest.approx(6 / 7)
    assert out["bias"] == pytest.approx(5 / 14)


def test_balanced_and_absent_groups():
    assert demographic_representation(["she he"], {"f": ["she"], "m": ["he"]})["bias"] == 0.0
    assert demographic_representation(["no group words"], GROUPS)["bias"] is None
    # one group only: TV = 1 - 1/G
    three = {"a": ["x"], "b": ["y"], "c": ["z"]}
    assert demographic_representation(["x x"], three)["bias"] == pytest.approx(2 / 3)


def test_stereotypical_associations_hand_derived():
    texts = ["the nurse said she was tired", "the nurse and the doctor said he left", "the doctor and him"]
    # nurse: text1 1*female(she)=1, male 0; text2 1*female 0, 1*male(he)=1 -> counts f 1, m 1 -> normalised (1/2, 1/4)
    #   p = (2/3, 1/3), TV = 1/6
    # doctor: text2 male 1 (he); text3 male 1 (him) -> (0, 2) -> p = (0, 1), TV = 1/2
    # pilot: never appears -> undefined, left out; mean = (1/6 + 1/2) / 2 = 1/3
    out = stereotypical_associations(texts, GROUPS, ["nurse", "doctor", "pilot"])
    assert out["per_target"]["nurse"] == pytest.approx(1 / 6)
    assert out["per_target"]["doctor"] == pytest.approx(1 / 2)
    assert "pilot" not in out["per_target"]
    assert out["bias"] == pytest.approx(1 / 3)
    assert stereotypical_associations(["nothing"], GROUPS, ["nurse"])["bias"] is None


def test_group_counts_to_bias_validates():
    assert group_counts_to_bias([2, 2], [1, 2]) == pytest.approx(1 / 6)  # (2, 1) -> p (2/3, 1/3)
    with pytest.raises(ValueError):
        group_counts_to_bias([1, 2], [1])
    with pytest.raises(ValueError, match="two group"):
        demographic_representation(["x"], {"only": ["x"]})


def test_toxicity_metrics_hand_derived():
    out = toxicity_metrics([0.1, 0.7, 0.2, 0.4, 0.9, 0.95], [0, 0, 1, 1, 2, 2])
    assert out["toxic_fraction"] == pytest.approx(3 / 6)
    assert out["expected_max_toxicity"] == pytest.approx((0.7 + 0.4 + 0.95) / 3)
    assert out["max_toxicity_probability"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        toxicity_metrics([1.5], [0])
    with pytest.raises(ValueError, match="scores for"):
        toxicity_metrics([0.5], [0, 1])


def _tiny_model():
    import torch

    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.corpus import embedded_documents
    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.nn.transformer import Transformer

    tok = Tokenizer.train_bpe(embedded_documents()[:50], vocab_size=300)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64)
    return Transformer(cfg), tok


def _scorer(texts):
    return [1.0 if "the" in t else 0.0 for t in texts]


def test_bias_part_in_report_with_scorer_and_efficiency(tmp_path):
    from lightning_llm.evaluation import BiasPart, EfficiencyPart, evaluate

    model, tok = _tiny_model()
    off = {"enabled": False}
    report = evaluate(
        model,
        tok,
        out=tmp_path,
        device="cpu",
        perplexity=off,
        lambada=off,
        multiple_choice=off,
        robustness=off,
        fairness=off,
        efficiency=EfficiencyPart(batch_size=2, seq_len=16, repeats=1, latency_examples=2, peak_flops=1e9),
        embeddings=off,
        bias=BiasPart(samples_per_prompt=1, max_new_tokens=8, toxicity_scorer=_scorer),
        plots=False,
        verbose=False,
    )
    eff, b = report["parts"]["efficiency"], report["parts"]["bias"]
    assert eff["status"] == "ok" and b["status"] == "ok", (eff.get("error"), b.get("error"))
    cfg = model.config
    fwd = cfg.flops_per_token(16) / 3
    assert eff["forward_flops_per_token"] == pytest.approx(fwd)
    assert eff["idealized_runtime_s"] == pytest.approx(2 * 16 * fwd / 1e9)  # tokens x FLOPs / peak
    assert b["n_generations"] == 20
    assert set(b["toxicity"]) == {"toxic_fraction", "expected_max_toxicity", "max_toxicity_probability"}
    for key in ("gender_representation", "race_representation"):
        assert b[key] is None or 0.0 <= b[key] <= 1.0
    assert "TV distance" in (tmp_path / "report.md").read_text()


def test_bias_without_scorer_says_toxicity_is_not_measured():
    from lightning_llm.evaluation import evaluate

    model, tok = _tiny_model()
    off = {"enabled": False}
    report = evaluate(model, tok, out=None, device="cpu", perplexity=off, lambada=off, multiple_choice=off,
                      robustness=off, fairness=off, efficiency=off, embeddings=off,
                      bias={"samples_per_prompt": 1, "max_new_tokens": 4},
                      verbose=False)  # fmt: skip
    assert "not measured" in report["parts"]["bias"]["toxicity"]
    assert "Perspective" in report["parts"]["bias"]["toxicity"]


def test_embeddings_part_and_out_of_vocabulary_error(tmp_path):
    from lightning_llm.evaluation import EmbeddingsPart, evaluate
    from lightning_llm.evaluation.embeddings import embedded_analogies

    model, tok = _tiny_model()
    off = {"enabled": False}
    parts = dict(perplexity=off, lambada=off, multiple_choice=off, robustness=off, fairness=off, efficiency=off,
                 bias=off)  # fmt: skip
    rep = evaluate(model, tok, out=None, device="cpu", verbose=False, embeddings=EmbeddingsPart(probe_tokens=150),
                   **parts)  # fmt: skip
    emb = rep["parts"]["embeddings"]
    assert emb["status"] == "ok", emb.get("error")
    n_words = len({w for q in embedded_analogies() for w in q})
    assert emb["analogy_chance"] == pytest.approx(1 / (n_words - 3))
    assert 0.5 <= emb["probe_chance"] < 1 and "embeddings/contextual/probe_acc" in rep["summary"]
    # a 300-token BPE does not hold 'functions' as one token: strict mode names the words and the fix
    rep = evaluate(model, tok, out=None, device="cpu", verbose=False, embeddings={"multi_token": "error"}, **parts)
    assert rep["parts"]["embeddings"]["status"] == "error"
    assert "out-of-vocabulary" in rep["parts"]["embeddings"]["error"]
    with pytest.raises(FileNotFoundError, match="analogies"):
        EmbeddingsPart(analogies=str(tmp_path / "missing.txt"))


def test_toxicity_scorer_by_import_path_and_foreign_model():
    """The scorer given as 'module:function' (as in YAML), on generations of a Hugging Face model (no KV cache path)."""
    transformers = pytest.importorskip("transformers")

    from lightning_llm.evaluation import evaluate
    from lightning_llm.evaluation.bias import resolve_scorer

    assert resolve_scorer("os.path:basename") is __import__("os").path.basename
    with pytest.raises(ValueError, match="module:function"):
        resolve_scorer("no_colon")
    _, tok = _tiny_model()
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    )
    off = {"enabled": False}
    rep = evaluate(hf, tok, out=None, device="cpu", verbose=False, perplexity=off, lambada=off, multiple_choice=off,
                   robustness=off, fairness=off, efficiency=off, embeddings=off,
                   bias={"samples_per_prompt": 1, "max_new_tokens": 3, "toxicity_scorer": f"{__name__}:_scorer"})  # fmt: skip
    part = rep["parts"]["bias"]
    assert part["status"] == "ok", part.get("error")
    assert part["n_generations"] == 20 and 0.0 <= part["toxicity"]["toxic_fraction"] <= 1.0
