"""LAMBADA against lm-evaluation-harness itself: same Hugging Face model, same passages, same numbers.

Reference: ``lm_eval.models.huggingface.HFLM(pretrained=<local dir>).loglikelihood`` on the requests of the
``lambada_openai`` task (``doc_to_text`` = every word but the last, ``doc_to_target`` = ``" " + last word``),
scored with the task's metrics: ``acc`` = mean of ``is_greedy``, ``ppl`` = ``exp(-mean(logprob))``
(``lm_eval.api.metrics.perplexity`` of the per-example log-likelihoods). Ours: ``LambadaDataModule`` +
``CausalLM(pretrained=..., eval_task="lambada")`` through ``Trainer.test`` and through the ``lightning-llm test``
CLI with ``configs/eval/lambada.yaml``. Accuracy must be identical (same correct count), perplexity within 1e-4
relative; per example, the token split and ``is_greedy`` must be identical and the log-likelihood within 1e-4.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.metrics import mean, perplexity  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from lightning_llm.data.lambada import LambadaDataModule, read_lambada_jsonl  # noqa: E402
from lightning_llm.metrics.functional.lambada import lambada_update  # noqa: E402
from lightning_llm.modules.causal_lm import CausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "eval" / "lambada.yaml"
SHARED = ROOT.parent / "shared" / "data" / "lambada_test.jsonl"
N_POSITIONS = 96  # the fixture model's n_positions (conftest.N_POSITIONS); the harness truncates to it
REL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster and not stalled by other load on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def harness_loglikelihood(model_dir: Path, texts: list[str], batch_size: int = 8, **hflm_kwargs):
    """Runs the harness; returns its ``(logprob, is_greedy)`` per passage and the token pairs it scored."""
    lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device="cpu", **hflm_kwargs)
    assert lm.max_length == N_POSITIONS
    requests = []
    for i, text in enumerate(texts):
        context = " ".join(text.split(" ")[:-1])  # lambada_openai doc_to_text
        target = " " + text.split(" ")[-1]  # lambada_openai doc_to_target
        requests.append(Instance(request_type="loglikelihood", doc={"text": text}, arguments=(context, target), idx=i))
    captured: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    inner = lm._loglikelihood_tokens

    def spy(reqs, **kwargs):  # record the (context_enc, continuation_enc) the harness built for each request
        for pair, context_enc, continuation_enc in reqs:
            captured[pair] = (list(context_enc), list(continuation_enc))
        return inner(reqs, **kwargs)

    lm._loglikelihood_tokens = spy
    results = lm.loglikelihood(requests, disable_tqdm=True)
    tokens = [captured[req.args] for req in requests]
    return results, tokens


def harness_metrics(results) -> dict[str, float]:
    """The task's aggregation: ``acc`` mean of is_greedy, ``ppl`` = perplexity(loglikelihoods)."""
    return {"acc": mean([float(g) for _, g in results]), "ppl": perplexity([ll for ll, _ in results])}


def ours_per_example(model_dir: Path, jsonl: Path, batch_size: int, **dm_kwargs):
    """Our data path and metric function, per example: (correct, logprob) by file index, and the encoded examples."""
    dm = LambadaDataModule(path=str(jsonl), tokenizer=str(model_dir), batch_size=batch_size, **dm_kwargs)
    dm.setup("test")
    model = CausalLM(pretrained=str(model_dir), eval_task="lambada").eval()
    correct, logprob = {}, {}
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits = model(batch["input_ids"], batch["attention_mask"])
            c, lp = lambada_update(logits, batch["targets"])
            for i, ci, li in zip(batch["index"].tolist(), c.tolist(), lp.tolist()):
                correct[i], logprob[i] = ci, li
    return correct, logprob, dm.examples


def trainer_test(model_dir: Path, jsonl: Path, batch_size: int, **dm_kwargs) -> dict[str, float]:
    import lightning as L

    dm = LambadaDataModule(path=str(jsonl), tokenizer=str(model_dir), batch_size=batch_size, **dm_kwargs)
    model = CausalLM(pretrained=str(model_dir), eval_task="lambada")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (out,) = trainer.test(model, datamodule=dm, verbose=False)
    return {"acc": float(out["test/lambada_acc"]), "ppl": float(out["test/lambada_ppl"])}


def assert_same_metrics(ours: dict[str, float], ref: dict[str, float], n: int) -> None:
    # identical accuracy: the same number of correct examples (ours may come back as a float32 scalar)
    assert round(ours["acc"] * n) == round(ref["acc"] * n), (ours, ref)
    assert ours["acc"] == pytest.approx(ref["acc"], rel=1e-6, abs=1e-7)
    assert ours["ppl"] == pytest.approx(ref["ppl"], rel=REL), (ours, ref)


def test_tokens_and_per_example_scores_match_harness(tiny_hf_dir, synthetic_jsonl):
    texts = read_lambada_jsonl(synthetic_jsonl)
    results, harness_tokens = harness_loglikelihood(tiny_hf_dir, texts, batch_size=8)
    correct, logprob, examples = ours_per_example(tiny_hf_dir, synthetic_jsonl, batch_size=5, max_length=N_POSITIONS)
    for i, (ex, (context_enc, continuation_enc)) in enumerate(zip(examples, harness_tokens)):
        assert (ex["context_ids"], ex["target_ids"]) == (context_enc, continuation_enc), texts[i]
    is_greedy = [g for _, g in results]
    assert [correct[i] for i in range(len(texts))] == is_greedy
    assert 0 < sum(is_greedy) < len(texts), "the fixture model should get some, not all, targets right"
    for i, (ll, _) in enumerate(results):
        assert logprob[i] == pytest.approx(ll, rel=REL, abs=1e-5), texts[i]
    # the edge cases are in the file: a truncated passage, a multi-token target, an empty context
    assert any(len(ex["context_ids"]) + len(ex["target_ids"]) > N_POSITIONS + 1 for ex in examples)
    assert any(len(ex["target_ids"]) > 1 for ex in examples)
    assert any(ex["context"] == "" for ex in examples)


def test_trainer_test_matches_harness(tiny_hf_dir, synthetic_jsonl):
    texts = read_lambada_jsonl(synthetic_jsonl)
    ref = harness_metrics(harness_loglikelihood(tiny_hf_dir, texts, batch_size=16)[0])
    ours = trainer_test(tiny_hf_dir, synthetic_jsonl, batch_size=16, max_length=N_POSITIONS)
    assert_same_metrics(ours, ref, len(texts))


def test_cli_matches_harness(tiny_hf_dir, synthetic_jsonl, tmp_path):
    texts = read_lambada_jsonl(synthetic_jsonl)
    ref = harness_metrics(harness_loglikelihood(tiny_hf_dir, texts, batch_size=8)[0])
    cmd = [sys.executable, "-m", "lightning_llm", "test", "--config", str(CONFIG)]
    cmd += ["--model.init_args.pretrained", str(tiny_hf_dir), "--data.init_args.tokenizer", str(tiny_hf_dir)]
    cmd += ["--data.init_args.path", str(synthetic_jsonl), "--data.init_args.max_length", str(N_POSITIONS)]
    cmd += ["--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.rglob("test_metrics.json")
    metrics = json.loads(path.read_text())
    acc = next(v for k, v in metrics.items() if k.endswith("lambada_acc"))
    ppl = next(v for k, v in metrics.items() if k.endswith("lambada_ppl"))
    assert_same_metrics({"acc": acc, "ppl": ppl}, ref, len(texts))


@pytest.mark.skipif(not SHARED.is_file(), reason=f"{SHARED} not present")
def test_shared_lambada_first_50_match_harness(tiny_hf_dir, tmp_path):
    """Real passages (quotes, newlines, passages longer than the model's 96 positions): same tokens, same numbers."""
    with SHARED.open(encoding="utf-8") as f:
        lines = [next(f) for _ in range(50)]
    jsonl = tmp_path / "lambada_50.jsonl"
    jsonl.write_text("".join(lines), encoding="utf-8")
    texts = read_lambada_jsonl(jsonl)
    results, harness_tokens = harness_loglikelihood(tiny_hf_dir, texts, batch_size=16)
    dm = LambadaDataModule(path=str(jsonl), tokenizer=str(tiny_hf_dir), max_length=N_POSITIONS)
    assert [(ex["context_ids"], ex["target_ids"]) for ex in dm.examples] == harness_tokens
    ours = trainer_test(tiny_hf_dir, jsonl, batch_size=16, max_length=N_POSITIONS)
    assert_same_metrics(ours, harness_metrics(results), len(texts))
    assert math.isfinite(ours["ppl"])


@pytest.mark.parametrize("add_bos", [None, False], ids=["harness-default", "add_bos_token-false"])
def test_bos_template_tokenizer_matches_harness(tiny_bos_dir, synthetic_jsonl, add_bos):
    """A Llama-style tokenizer that adds ``<s>``: HFLM's default (``add_bos_token=None``) keeps the tokenizer's
    template, so every context starts with bos; ``add_bos_token=False`` drops it. Ours: ``add_special_tokens``."""
    texts = read_lambada_jsonl(synthetic_jsonl)
    results, harness_tokens = harness_loglikelihood(tiny_bos_dir, texts, batch_size=8, add_bos_token=add_bos)
    kwargs = {"max_length": N_POSITIONS, "add_special_tokens": add_bos is None}
    correct, logprob, examples = ours_per_example(tiny_bos_dir, synthetic_jsonl, batch_size=8, **kwargs)
    assert [(ex["context_ids"], ex["target_ids"]) for ex in examples] == harness_tokens
    bos = examples[0]["context_ids"][0] if add_bos is None else None
    assert all((ex["context_ids"][0] == bos) == (add_bos is None) for ex in examples if ex["context"])
    assert [correct[i] for i in range(len(texts))] == [g for _, g in results]
    assert [logprob[i] for i in range(len(texts))] == pytest.approx([ll for ll, _ in results], rel=REL, abs=1e-5)
