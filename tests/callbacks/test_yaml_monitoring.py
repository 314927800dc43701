"""Monitoring from YAML: callbacks built from names and sizes only, the stacked presets, bad data paths, and the
embeddings-as-knowledge probe against hand-derived values."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "callbacks"

MONITORING_KEYS = {
    "val/ppl_monitor",
    "val/ppl_monitor_data",
    "val/ppl_monitor_data_bits_per_byte",
    "lambada/acc",
    "lambada/ppl",
    "calibration/ece",
    "calibration/ece_10_bin",
    "embedding/anisotropy",
    "embedding/static/analogy_acc",
    "embedding/contextual/probe_acc",
    "embedding/analogy_chance",
    "embedding/probe_chance",
    "throughput/tokens_per_sec",
    "throughput/mfu",
}


def test_presets_append_rather_than_replace():
    """Every preset appends (`callbacks+:`), so several stack onto one fit; monitoring.yaml holds them all."""
    import yaml

    names = set()
    for path in sorted(PRESETS.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert list(cfg["trainer"]) == ["callbacks+"], path
        if path.stem == "monitoring":
            names = {c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks+"]}
    assert {"PerplexityMonitor", "LambadaMonitor", "CalibrationMonitor", "EmbeddingProbe", "LossSpikeGuard",
            "LLMThroughputMonitor", "GenerationSamples"} <= names  # fmt: skip


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "lightning_llm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_stacked_presets_print_config(tmp_path):
    """Two stacked presets give both callbacks (jsonargparse's list append), after the quickstart's plugins."""
    proc = _cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(PRESETS / "lambada.yaml"),
                 "--config", str(PRESETS / "loss_spike_guard.yaml"), "--print_config"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LambadaMonitor" in proc.stdout and "LossSpikeGuard" in proc.stdout


@pytest.mark.slow
def test_quickstart_with_monitoring_preset_logs_the_curves(tmp_path):
    """The quickstart plus configs/callbacks/monitoring.yaml for a few steps: every monitor's key is in the CSV."""
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(PRESETS / "monitoring.yaml"),
            "--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32",
            "--model.init_args.config.n_head", "2", "--data.init_args.vocab_size", "300",
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (csv_path,) = tmp_path.rglob("metrics.csv")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v not in ("", None)}
    assert MONITORING_KEYS <= logged, sorted(MONITORING_KEYS - logged)
    lambada = [float(r["lambada/acc"]) for r in rows if r.get("lambada/acc")]
    assert len(lambada) >= 2 and all(0.0 <= a <= 1.0 for a in lambada)  # at each validation (steps 4, 8, final)
    assert list(tmp_path.rglob("samples.txt")) and list(tmp_path.rglob("learning_curves.png"))
    assert list(tmp_path.rglob("step_*.png"))  # the reliability diagram


@pytest.mark.parametrize(
    "build",
    [
        lambda: __import__("lightning_llm.callbacks", fromlist=["x"]).PerplexityMonitor(dataset="data/missing.txt"),
        lambda: __import__("lightning_llm.callbacks", fromlist=["x"]).LambadaMonitor(path="missing/lambada.jsonl"),
        lambda: __import__("lightning_llm.callbacks", fromlist=["x"]).CalibrationMonitor(dataset="./mc.jsonl"),
        lambda: __import__("lightning_llm.callbacks", fromlist=["x"]).EvalSubsetMonitor({"notes": "notes.md"}),
        lambda: __import__("lightning_llm.callbacks", fromlist=["x"]).EmbeddingProbe(analogies="questions.txt"),
    ],
)
def test_missing_dataset_path_fails_at_construction(build):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build()


def test_named_datasets_in_training(tmp_path, make_trainer):
    """PerplexityMonitor(dataset=...) and EvalSubsetMonitor({name: path}) build their batches with the module's
    tokenizer; the values equal subset_metrics on the same batches built by hand."""
    from lightning_llm import CausalLM
    from lightning_llm.callbacks import EvalSubsetMonitor, PerplexityMonitor, subset_metrics
    from lightning_llm.callbacks._utils import lm_batches, load_texts
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.tokenizer import Tokenizer

    text = "the cat sat on the mat. " * 40
    (tmp_path / "notes.txt").write_text(text + "\n\n" + text)
    tok = Tokenizer.train_bpe([text], vocab_size=280)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32)
    module = CausalLM(config=cfg)
    module.tokenizer = tok
    stream = torch.tensor(tok.encode(text) * 8)
    train = [{"input_ids": stream[i : i + 16][None], "targets": stream[i + 1 : i + 17][None]} for i in range(0, 64, 16)]
    ppl = PerplexityMonitor(dataset=str(tmp_path / "notes.txt"), every_n_steps=2, seq_len=16, batch_size=2,
                            max_batches=2, on_validation=False)  # fmt: skip
    sub = EvalSubsetMonitor({"notes": str(tmp_path / "notes.txt")}, every_n_steps=2, seq_len=16, batch_size=2,
                            max_batches=2)  # fmt: skip
    loader = torch.utils.data.DataLoader(train, batch_size=None)  # a plain list would be read as several loaders
    make_trainer([ppl, sub], steps=2).fit(module, train_dataloaders=loader)
    batches = lm_batches(load_texts(str(tmp_path / "notes.txt")), tok, 16, 2, 2)
    module.eval()
    ref = subset_metrics(module, batches)
    assert sub.history[-1][1]["notes"]["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert ppl.last["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    n_bytes = sum(len(tok.decode(b["targets"].flatten().tolist()).encode()) for b in batches)
    nll = ref["loss"] * ref["tokens"]
    assert ppl.last["bits_per_byte"] == pytest.approx(nll / (n_bytes * torch.log(torch.tensor(2.0)).item()), rel=1e-5)


def test_callbacks_without_tokenizer_say_how_to_fix(make_trainer):
    """A foreign module with no tokenizer anywhere: the named-data callbacks fail with the fix in the message."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_llm.callbacks._utils import resolve_tokenizer

    with pytest.raises(ValueError, match="needs a tokenizer"):
        resolve_tokenizer(None, None, BoringModel(), "LambadaMonitor")


# ------------------------------------------------------------------------------------ embeddings as knowledge
def test_analogy_accuracy_hand_derived():
    from lightning_llm.evaluation.embeddings import analogy_accuracy

    # a structured space: plural = +e2 offset, so b - a + c = d exactly for both questions
    v = {
        "cat": torch.tensor([1.0, 0.0, 0.0]),
        "cats": torch.tensor([1.0, 1.0, 0.0]),
        "dog": torch.tensor([0.0, 0.0, 1.0]),
        "dogs": torch.tensor([0.0, 1.0, 1.0]),
        "tree": torch.tensor([-1.0, 0.0, 0.0]),
    }
    res = analogy_accuracy(v, [("cat", "cats", "dog", "dogs"), ("dog", "dogs", "cat", "cats")])
    assert res == {"accuracy": 1.0, "chance": 1 / 2, "questions": 2, "vocabulary": 5}
    # a question whose answer is wrong in this space: cat:dog :: cats:? -> cats - cat + dog = (0,1,1) = dogs, not tree
    res = analogy_accuracy(v, [("cat", "dog", "cats", "tree")])
    assert res["accuracy"] == 0.0


def test_linear_probe_separable_and_chance():
    from lightning_llm.evaluation.embeddings import linear_probe

    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 30 + [1] * 10)
    x = torch.randn(40, 4, generator=gen)
    x[:, 0] += 6.0 * y  # class 1 shifted far along one axis: linearly separable
    res = linear_probe(x, y)
    assert res["accuracy"] == 1.0 and res["chance"] == 0.75  # majority share 30/40


def test_probe_on_structured_embedding_beats_chance():
    """Static embeddings where the first coordinate carries the property: the probe finds it, chance stays."""
    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.evaluation.embeddings import linear_probe, token_property_labels

    tok = Tokenizer.train_bpe(["the cat sat on the mat 123 456 The Cat"] * 20, vocab_size=300)
    ids = list(range(tok.vocab_size))
    labels = token_property_labels(tok, ids, "starts_word")
    assert labels.sum() > 5 and (1 - labels).sum() > 5
    w = torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 5.0 * labels
    assert linear_probe(w, labels)["accuracy"] == 1.0
    assert linear_probe(w, labels)["chance"] == pytest.approx(max(labels.float().mean(), 1 - labels.float().mean()))


def test_out_of_vocabulary_probe_words_are_a_clear_error():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.evaluation.embeddings import word_token_ids

    wl = HFTokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "cat": 2, "cats": 3}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(wl, eos_id=1)
    assert word_token_ids(tok, ["cat", "cats"]) == {"cat": [2], "cats": [3]}
    with pytest.raises(ValueError, match=r"out-of-vocabulary.*\['dog'\]"):
        word_token_ids(tok, ["cat", "dog"])
    bpe = Tokenizer.train_bpe(["the cat sat"] * 10, vocab_size=270)
    with pytest.raises(ValueError, match="not single tokens"):
        word_token_ids(bpe, ["zebra"], multi_token="error")


def test_embedding_probe_knowledge_in_training(make_trainer):
    from lightning_llm import CausalLM
    from lightning_llm.callbacks import EmbeddingProbe
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.corpus import embedded_documents
    from lightning_llm.data.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(embedded_documents()[:40], vocab_size=300)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32)
    module = CausalLM(config=cfg)
    module.tokenizer = tok
    stream = torch.tensor(tok.encode(embedded_documents()[0])[:80])
    train = [{"input_ids": stream[i : i + 16][None], "targets": stream[i + 1 : i + 17][None]} for i in range(0, 48, 16)]
    probe = EmbeddingProbe(every_n_steps=2, knowledge=True, probe_tokens=200)
    make_trainer([probe], steps=2).fit(module, train_dataloaders=torch.utils.data.DataLoader(train, batch_size=None))
    stats = probe.history[-1][1]
    for key in ("static/analogy_acc", "contextual/analogy_acc", "static/probe_acc", "contextual/probe_acc"):
        assert 0.0 <= stats[key] <= 1.0, key
    from lightning_llm.evaluation.embeddings import embedded_analogies

    n_words = len({w for q in embedded_analogies() for w in q})
    assert stats["analogy_chance"] == pytest.approx(1 / (n_words - 3))


def test_torch_logistic_probe_matches_scikit_learn():
    """Our L-BFGS logistic regression gives scikit-learn's coefficients and the probe its fold predictions."""
    sklearn = pytest.importorskip("sklearn")  # noqa: F841
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from lightning_llm.evaluation.embeddings import fit_logistic, linear_probe, stratified_folds

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(120, generator=gen, dtype=torch.float64)) > 0).long()
    w, b = fit_logistic(x, y)
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=10000).fit(x.numpy(), y.numpy())
    assert torch.allclose(w, torch.from_numpy(ref.coef_[0]), atol=1e-5)
    assert float(b) == pytest.approx(float(ref.intercept_[0]), abs=1e-5)
    hits = 0
    for test in stratified_folds(y, 5, seed=0):
        train = torch.ones(120, dtype=torch.bool)
        train[test] = False
        scaler = StandardScaler().fit(x[train].numpy())
        clf = LogisticRegression(C=1.0, tol=1e-12, max_iter=10000).fit(scaler.transform(x[train].numpy()), y[train])
        hits += int((clf.predict(scaler.transform(x[test].numpy())) == y[test].numpy()).sum())
    assert linear_probe(x, y, folds=5, seed=0)["accuracy"] == hits / 120
    assert sorted(torch.cat(stratified_folds(y, 5)).tolist()) == list(range(120))  # a partition
