"""HarnessLM against lm-evaluation-harness's own HFLM: the same local tasks, the same tiny saved GPT-2.

Five tasks, each a local YAML over a local .jsonl (no network): a LAMBADA-style cloze (loglikelihood), two
multiple-choice tasks (one-word answers; multi-token answers, which HarnessLM scores over each question's cached
context), a rolling-perplexity task (loglikelihood_rolling) and a generate_until task. The reference is
``lm_eval.models.huggingface.HFLM`` on the very directory HarnessLM reads (converted by ``load_pretrained`` into our
Transformer): accuracies must be identical and every per-sample log-likelihood within 1e-4.

How HarnessLM computes (the end of the file): its batching (``_partition``) against a brute force over every split,
the rank assignment against a hand-derived one, shared forward rows for inputs that are prefixes of one another and
continuations run over their context's KV cache against HFLM's token-level scores (and, where lm-eval 0.4.13's HFLM
scores a one-token continuation at the wrong position, against the Hugging Face model's own logits), and generation that stops early at a stop string against HFLM's generations. The
data-parallel runs (2 gloo processes) are in ``test_harness_distributed.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the rain in spain falls mainly on the plain",
    "the early bird catches the worm",
    "every good boy deserves fudge",
]
N_POSITIONS = 64


def _passages(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = sorted({w for s in SENTENCES for w in s.split()})
    out = []
    for i in range(n):
        text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 3)))
        if i % 4 == 3:
            text = text.rsplit(" ", 1)[0] + " " + rng.choice(words)
        out.append(text)
    return out


def build_tiny_gpt2(directory: Path, steps: int = 80) -> Path:
    """A 2-layer width-48 GPT-2 and a 400-token BPE, trained a few seconds on the sentences, saved offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_llm.data.tokenizer import Tokenizer

    train = _passages(300, seed=1)
    tok = Tokenizer.train_bpe(train + ["Question: Answer: yes no maybe 0 1 2 3 4 5 6 7 8 9 +\n"] * 5, vocab_size=400)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=N_POSITIONS, n_embd=48, n_layer=2, n_head=4,
                        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    stream = torch.tensor([i for t in train for i in [*tok.encode(t), tok.eos_id]], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - 48, (8,), generator=g)
        batch = torch.stack([stream[s : s + 48] for s in starts.tolist()])  # (8, 48)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


def write_tasks(directory: Path) -> Path:
    """Five local task YAMLs (+ their .jsonl data) in ``directory``; returns it (the harness's include_path)."""
    directory.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, rows: list[dict]) -> str:
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    cloze = [{"text": t} for t in _passages(24, seed=2)]
    cloze.append({"text": " ".join(SENTENCES * 2)})  # longer than the model's 64 positions: left-truncated
    rng = random.Random(3)
    mc = []
    for i in range(16):
        s = rng.choice(SENTENCES).split()
        wrong = [rng.choice(SENTENCES).split()[-1] for _ in range(2)]
        choices = [s[-1], *wrong] if i % 2 else [*wrong, s[-1]]
        label = choices.index(s[-1]) if i % 3 else (choices.index(s[-1]) + 1) % 3  # every third key is wrong
        mc.append({"question": " ".join(s[:-1]), "choices": choices, "label": label})
    # multi-token answers (2-3 words): each question's choices share its forward in HarnessLM. "Question: ...
    # Answer:" keeps every context + continuation[:-1] distinct from the other requests' (see the shared-context test)
    mc_long = []
    for i in range(12):
        s = rng.choice(SENTENCES).split()
        k = 2 + i % 2
        right = " ".join(s[-k:])
        choices = [right, *(" ".join(rng.choice(SENTENCES).split()[-k:]) for _ in range(3))]
        rng.shuffle(choices)
        mc_long.append({"question": " ".join(s[:-k]), "choices": choices, "label": choices.index(right)})
    docs = [{"text": " ".join(_passages(6, seed=10 + i))} for i in range(4)]  # some longer than 64 tokens: windows
    gen = [{"prompt": " ".join(s.split()[:-2]), "answer": " ".join(s.split()[-2:])} for s in SENTENCES]

    def multiple_choice(task: str, data: str, text: str) -> str:
        return (
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{text}"\ndoc_to_target: label\n'
            'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
        )

    tasks = {
        "tiny_cloze": f"""task: tiny_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl("cloze", cloze)}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
        "tiny_mc": multiple_choice("tiny_mc", jsonl("mc", mc), "{{question}}"),
        "tiny_mc_long": multiple_choice("tiny_mc_long", jsonl("mc_long", mc_long), "Question: {{question}} Answer:"),
        "tiny_rolling": f"""task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl("docs", docs)}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
        "tiny_gen": f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl("gen", gen)}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{' ' + answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    }
    for name, text in tasks.items():
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return directory


TASKS = ["tiny_cloze", "tiny_mc", "tiny_mc_long", "tiny_rolling", "tiny_gen"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_gpt2(tmp_path_factory.mktemp("harness_gpt2"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("harness_tasks"))


def _run(model, task_dir: Path, tasks=TASKS) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


def _sample_values(res: dict, task: str) -> list:
    """Per-sample raw outputs: log-likelihoods (and greedy flags) or generated strings, in document order."""
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


@pytest.fixture(scope="module")
def both(tiny_dir, task_dir):
    from lm_eval.models.huggingface import HFLM

    from lightning_llm.evaluation import HarnessLM

    ref = _run(HFLM(pretrained=str(tiny_dir), batch_size=4, device="cpu"), task_dir)
    ours = _run(HarnessLM(str(tiny_dir), batch_size=4, device="cpu"), task_dir)
    return ref, ours


def test_results_match_hflm(both):
    ref, ours = both
    for task in TASKS:
        r, o = ref["results"][task], ours["results"][task]
        for key, value in r.items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                if key.startswith(("acc", "exact_match")):
                    assert o[key] == value, (task, key, o[key], value)  # accuracies identical
                else:
                    assert o[key] == pytest.approx(value, rel=1e-5), (task, key)


def test_per_sample_loglikelihoods_match_hflm(both):
    ref, ours = both
    for task in ("tiny_cloze", "tiny_mc", "tiny_mc_long", "tiny_rolling"):
        for r_resps, o_resps in zip(_sample_values(ref, task), _sample_values(ours, task), strict=True):
            for r, o in zip(r_resps, o_resps, strict=True):
                r_ll = r[0][0] if isinstance(r[0], (list, tuple)) else r[0]
                o_ll = o[0][0] if isinstance(o[0], (list, tuple)) else o[0]
                assert abs(float(o_ll) - float(r_ll)) < 1e-4, (task, o_ll, r_ll)
                if isinstance(r[0], (list, tuple)):
                    assert bool(o[0][1]) == bool(r[0][1])  # is_greedy
    assert _sample_values(ref, "tiny_gen") == _sample_values(ours, "tiny_gen")  # generations identical


def test_results_are_not_trivial(both):
    """The comparison means something: some targets right, some wrong, some generations non-empty."""
    _, ours = both
    assert 0 < ours["results"]["tiny_cloze"]["acc,none"] < 1
    assert 0 < ours["results"]["tiny_mc"]["acc,none"] < 1
    assert 0 < ours["results"]["tiny_mc_long"]["acc,none"] < 1
    assert any(g[0][0].strip() for g in _sample_values(ours, "tiny_gen"))


def _ckpt(module) -> dict:
    """What Lightning's ``Trainer.save_checkpoint`` stores for a module: weights, hyper-parameters, the module's hook."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    return ckpt


@pytest.mark.parametrize("kind", ["ckpt", "sharded", "in_memory", "lightning_module"])
def test_every_model_kind_gives_the_hf_directory_numbers(kind, tiny_dir, task_dir, tmp_path):
    """Our .ckpt, a sharded folder, an in-memory Transformer and a LightningModule: the HF directory's numbers."""
    from lightning_llm.evaluation import HarnessLM
    from lightning_llm.loading import load_pretrained
    from lightning_llm.modules.causal_lm import CausalLM

    module = CausalLM(pretrained=str(tiny_dir))  # converted by load_pretrained; the tokenizer travels with it
    module.configure_model()
    if kind == "ckpt":
        torch.save(_ckpt(module), tmp_path / "m.ckpt")
        model = HarnessLM(str(tmp_path / "m.ckpt"), batch_size=3, device="cpu")
    elif kind == "sharded":
        import torch.distributed.checkpoint as dcp

        ckpt = _ckpt(module)
        dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=tmp_path / "sharded.ckpt")
        torch.save(ckpt, tmp_path / "sharded.ckpt" / "meta.pt")
        model = HarnessLM(str(tmp_path / "sharded.ckpt"), batch_size=3, device="cpu")
    elif kind == "in_memory":
        net, tok = load_pretrained(tiny_dir)
        model = HarnessLM(net, tokenizer=tok, batch_size=3, device="cpu")
    else:
        model = HarnessLM(module, batch_size=3, device="cpu")
    a = _run(model, task_dir, ["tiny_cloze", "tiny_gen"])
    b = _run(HarnessLM(str(tiny_dir), batch_size=8, device="cpu"), task_dir, ["tiny_cloze", "tiny_gen"])
    assert a["results"]["tiny_cloze"]["acc,none"] == b["results"]["tiny_cloze"]["acc,none"]
    assert a["results"]["tiny_cloze"]["perplexity,none"] == pytest.approx(b["results"]["tiny_cloze"]["perplexity,none"])
    assert _sample_values(a, "tiny_gen") == _sample_values(b, "tiny_gen")


def test_generate_until_needs_our_transformer(tiny_dir, task_dir):
    """A generation task on a model we cannot decode with our KV cache: a clear error, not a wrong number."""
    from transformers import GPT2LMHeadModel

    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.evaluation import HarnessLM

    hf = GPT2LMHeadModel.from_pretrained(tiny_dir)
    lm = HarnessLM(hf, tokenizer=Tokenizer.from_pretrained(tiny_dir), device="cpu")
    with pytest.raises(ValueError, match="generate_until"):
        _run(lm, task_dir, ["tiny_gen"])
    res = _run(lm, task_dir, ["tiny_cloze"])  # loglikelihood works for any ids -> logits module
    assert "acc,none" in res["results"]["tiny_cloze"]


def test_too_many_new_tokens_is_a_clear_error(tiny_dir, task_dir):
    from lightning_llm.evaluation import HarnessLM

    lm = HarnessLM(str(tiny_dir), device="cpu", max_length=6)
    with pytest.raises(ValueError, match="max_gen_toks"):
        _run(lm, task_dir, ["tiny_gen"])


def test_bad_arguments(tiny_dir):
    from lightning_llm.evaluation import HarnessLM

    with pytest.raises(ValueError, match="batch_size"):
        HarnessLM(str(tiny_dir), batch_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HarnessLM(str(tiny_dir / "missing"))


def test_evaluate_harness_part(tiny_dir, task_dir, tmp_path):
    """``evaluate(..., harness=HarnessPart(...))`` puts the harness's results into the report and its summary."""
    from lightning_llm.evaluation import HarnessPart, evaluate

    off = {"enabled": False}
    report = evaluate(
        str(tiny_dir),
        out=tmp_path / "eval",
        device="cpu",
        perplexity=off,
        lambada=off,
        multiple_choice=off,
        robustness=off,
        fairness=off,
        efficiency=off,
        bias=off,
        embeddings=off,
        harness=HarnessPart(enabled=True, tasks=("tiny_cloze", "tiny_mc"), include_path=str(task_dir), limit=8),
        plots=False,
        verbose=False,
    )
    part = report["parts"]["harness"]
    assert part["status"] == "ok", part.get("error")
    assert set(part["results"]) == {"tiny_cloze", "tiny_mc"}
    assert part["n_samples"]["tiny_cloze"] == 8
    assert "harness/tiny_mc/acc" in report["summary"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "tiny_cloze" in md
    json.dumps(report["parts"]["harness"])  # serialisable


def test_harness_part_needs_tasks():
    from lightning_llm.evaluation import HarnessPart

    with pytest.raises(ValueError, match="tasks"):
        HarnessPart(enabled=True, tasks=())
    with pytest.raises(ValueError, match=r"`harness.compile` must be true or false, got 'yes'"):
        HarnessPart(enabled=True, compile="yes")


def test_harness_part_from_the_command_line(tiny_dir, task_dir, tmp_path, monkeypatch):
    """`lightning-llm evaluate --harness.enabled true --harness.tasks [...]` parses into HarnessPart and runs;
    `--harness.compile true` decodes the generation task with the compiled step."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    import lightning_llm.nn.generation as generation
    from lightning_llm.evaluation import HarnessPart, evaluate

    monkeypatch.setattr(generation, "_COMPILE_BACKEND", "aot_eager")  # the traced graph, without a C++ build
    monkeypatch.setattr(generation, "_compiled_steps", {})
    monkeypatch.setattr(generation, "_compile_error", None)
    torch._dynamo.reset()

    parser = ArgumentParser(prog="lightning-llm evaluate", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate)
    argv = [
        "--model",
        str(tiny_dir),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--verbose",
        "false",
        "--plots",
        "false",
        "--harness.enabled",
        "true",
        "--harness.tasks",
        "[tiny_cloze, tiny_gen]",
        "--harness.include_path",
        str(task_dir),
        "--harness.include_defaults",
        "false",
        "--harness.limit",
        "5",
        "--harness.compile",
        "true",
    ]
    for part in (
        "perplexity",
        "lambada",
        "multiple_choice",
        "robustness",
        "fairness",
        "efficiency",
        "bias",
        "embeddings",
    ):
        argv += [f"--{part}.enabled", "false"]  # fmt: skip
    init = parser.instantiate(parser.parse_args(argv)).as_dict()
    init.pop("config")
    assert init["harness"] == HarnessPart(enabled=True, tasks=("tiny_cloze", "tiny_gen"), include_path=str(task_dir),
                                          include_defaults=False, limit=5, compile=True)  # fmt: skip
    report = evaluate(**init)
    part = report["parts"]["harness"]
    assert part["status"] == "ok", part.get("error")
    assert part["n_samples"] == {"tiny_cloze": 5, "tiny_gen": 5}
    assert "harness/tiny_gen/exact_match" in report["summary"]
    assert "cpu" in generation._compiled_steps and generation._compile_error is None  # the compiled step decoded
    torch._dynamo.reset()


def test_unknown_harness_task_is_a_clear_error(tiny_dir, task_dir):
    from lightning_llm.evaluation import HarnessPart, evaluate

    off = {"enabled": False}
    parts = {p: off for p in ("perplexity", "lambada", "multiple_choice", "robustness", "fairness", "efficiency",
                              "bias", "embeddings")}  # fmt: skip
    report = evaluate(str(tiny_dir), out=None, device="cpu", verbose=False, **parts,
                      harness=HarnessPart(enabled=True, tasks=("tiny_clozee",), include_path=str(task_dir),
                                          include_defaults=False))  # fmt: skip
    assert report["parts"]["harness"]["status"] == "error"
    assert "not harness tasks" in report["parts"]["harness"]["error"]


def test_lm_eval_command_line_with_our_model_equals_its_hf_model(tiny_dir, task_dir, tmp_path):
    """``python -m lightning_llm.evaluation.harness_cli --model lightning_llm ...`` (the harness's own command line, our
    model registered) against ``python -m lm_eval --model hf ...`` on the same directory: exit 0, the same numbers."""
    import subprocess
    import sys

    def run(module: str, model: str) -> dict:
        out = tmp_path / model
        args = [sys.executable, "-m", module, "--model", model, "--model_args", f"pretrained={tiny_dir}", "--device",
                "cpu", "--tasks", "tiny_cloze,tiny_gen", "--include_path", str(task_dir), "--limit", "6",
                "--batch_size", "4", "--output_path", str(out)]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (results,) = out.rglob("results_*.json")
        return json.loads(results.read_text())["results"]

    ours, ref = run("lightning_llm.evaluation.harness_cli", "lightning_llm"), run("lm_eval", "hf")
    for task in ("tiny_cloze", "tiny_gen"):
        for key, value in ref[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours[task][key] == pytest.approx(value, rel=1e-5), (task, key)
    assert 0 < ours["tiny_cloze"]["acc,none"] < 1


# ---------------------------------------------------------------------------------------------------- how it is computed
def test_partition_is_the_cheapest_split():
    """``_partition`` against every split of the rows into consecutive batches (brute force over the cut points)."""
    import itertools

    from lightning_llm.evaluation.harness import _partition

    def cost(spans, widths, overhead):
        return sum((end - start) * widths[start] + overhead for start, end in spans)

    def fits(span, widths, max_rows, max_tokens):  # one row always fits; more only within the token budget
        rows = span[1] - span[0]
        return 0 < rows <= max_rows and (rows == 1 or rows * widths[span[0]] <= max_tokens)

    rng = random.Random(0)
    for _ in range(60):
        n, max_rows, overhead = rng.randint(1, 9), rng.randint(1, 4), rng.choice([0, 3, 16, 100, math.inf])
        max_tokens = rng.choice([math.inf, 30, 70, 120])
        widths = sorted((rng.randint(1, 60) for _ in range(n)), reverse=True)
        spans = _partition(widths, max_rows, overhead, max_tokens)
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and spans[-1][1] == n  # contiguous, all rows
        assert all(fits(span, widths, max_rows, max_tokens) for span in spans)
        if math.isinf(overhead) and math.isinf(max_tokens):  # the plain cut every max_rows rows
            assert spans == [(s, min(s + max_rows, n)) for s in range(0, n, max_rows)]
            continue

        def key(sp, widths=widths, overhead=overhead):  # overhead inf: the fewest forwards, then the least padding
            return (len(sp), cost(sp, widths, 0)) if math.isinf(overhead) else cost(sp, widths, overhead)

        best = None
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            split = list(zip(bounds[:-1], bounds[1:]))
            if all(fits(span, widths, max_rows, max_tokens) for span in split):
                best = key(split) if best is None else min(best, key(split))
        assert key(spans) == best
    assert _partition([9, 5, 5, 1, 1], 2, math.inf) == [(0, 2), (2, 4), (4, 5)]  # plain cut every max_rows rows
    assert _partition([9, 5, 5, 1, 1], 4, 0, max_tokens=10) == [(0, 1), (1, 3), (3, 5)]  # 9 alone; 2 x 5 fits 10
    assert _partition([20, 3], 4, 100, max_tokens=10) == [(0, 1), (1, 2)]  # a row wider than the budget goes alone
    assert _partition([], 4, 16) == []


def test_assign_balances_the_costliest_first():
    from lightning_llm.evaluation.harness import _assign

    # by hand: 5 -> rank 0 (loads 5, 0); 4 -> 1 (5, 4); 3 -> 1 (5, 7); 3 -> 0 (8, 7); 3 -> 1 (8, 10)
    assert _assign([5, 4, 3, 3, 3], 2) == [0, 1, 1, 0, 1]
    assert _assign([1.0] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]
    assert _assign([], 2) == []


def test_prefix_sharing_scores_like_hflm(tiny_dir):
    """Requests whose model inputs are prefixes of one another share one forward row and still give HFLM's numbers.

    Inputs (context + continuation minus its last token): ``ctx`` for the one-token continuations ``[a]`` and
    ``[x]``, ``ctx + [a]`` for ``[a, b]`` (twice), ``ctx + [a, b]`` for ``[a, b, c]``: all prefixes of the last, so
    one row; another context is a second row. The reference is HFLM's own token-level ``_loglikelihood_tokens``.
    """
    from lm_eval.models.huggingface import HFLM

    from lightning_llm.evaluation import HarnessLM

    ours = HarnessLM(str(tiny_dir), batch_size=4, device="cpu")
    ctx = ours.tok_encode("the quick brown fox jumps")
    other = ours.tok_encode("a stitch in time")
    a, b, c = ours.tok_encode(" over the lazy")
    x = ours.tok_encode(" sea")[0]
    conts = [[a], [x], [a, b], [a, b], [a, b, c]]
    requests = [(("ctx", str(k)), ctx, cont) for k, cont in enumerate(conts)] + [(("other", "s"), other, [x])]
    got = ours._loglikelihood_tokens(requests)
    assert ours.work["rows"] == 2 and ours.work["batches"] == 1
    ref = HFLM(pretrained=str(tiny_dir), batch_size=1, device="cpu")._loglikelihood_tokens(requests)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, ref, strict=True):
        assert abs(lp - ref_lp) < 1e-4 and greedy == ref_greedy, (lp, ref_lp)
    assert got[2] == got[3]  # the duplicate: scored once
    assert any(g for _, g in ref) and not all(g for _, g in ref)  # the greedy flags are compared both ways


def test_continuations_of_one_context_run_over_its_cache_and_score_like_hflm(tiny_dir, monkeypatch):
    """Multi-token continuations of one context (multiple-choice answers) run the context once and the answers over
    its cached keys and values: HFLM's numbers (its token-level ``_loglikelihood_tokens``, every request a full row),
    fewer tokens than one row per answer, and the same scores as that plain path.

    Contexts of different lengths share a batch (left padding); the answers are 1-5 tokens (right padding), one is the
    model's own greedy continuation (``is_greedy`` True), one is repeated, and one request is longer than
    ``max_length`` (left-truncated: it keeps the plain path).
    """
    from lm_eval.models.huggingface import HFLM

    from lightning_llm.evaluation import HarnessLM
    from lightning_llm.nn.generation import generate

    ours = HarnessLM(str(tiny_dir), batch_size=3, device="cpu")
    rng = random.Random(5)
    words = sorted({w for s in SENTENCES for w in s.split()})
    requests = []
    for q in range(6):
        ctx = ours.tok_encode(" ".join(rng.choice(words) for _ in range(rng.randint(2, 14))))
        conts = [ours.tok_encode(" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))) for _ in range(3)]
        if q == 0:  # the model's own greedy continuation
            conts.append(generate(ours.module, [ctx], max_new_tokens=3, temperature=0.0).responses[0].tolist())
        requests += [((f"q{q}", str(c)), ctx, cont) for c, cont in enumerate(conts)]
    requests.append((("again", "0"), requests[1][1], requests[1][2]))
    long_ctx = ours.tok_encode(" ".join(SENTENCES))[: N_POSITIONS + 4]  # longer than the 64 positions
    requests += [(("long", str(c)), long_ctx, ours.tok_encode(cont)) for c, cont in enumerate([" the lazy", " a"])]
    assert len(ours._context_groups(requests)) == 6  # every question but the truncated one
    # rolling windows: a one-token context before long continuations saves nothing worth a second pass
    assert ours._context_groups([(None, [0], list(range(1, 30))), (None, [0], list(range(2, 40)))]) == {}

    got = ours._loglikelihood_tokens(requests)
    shared_tokens = ours.work["tokens"]
    ref = HFLM(pretrained=str(tiny_dir), batch_size=1, device="cpu")._loglikelihood_tokens(requests)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, ref, strict=True):
        assert abs(lp - ref_lp) < 1e-4 and greedy == ref_greedy, (lp, ref_lp)
    assert got[3][1] is True and not all(g for _, g in got)  # (the greedy answer) flags compared both ways

    plain = HarnessLM(str(tiny_dir), batch_size=3, device="cpu")
    monkeypatch.setattr(plain, "_context_groups", lambda reqs: {})
    for (lp, greedy), (plain_lp, plain_greedy) in zip(got, plain._loglikelihood_tokens(requests), strict=True):
        assert abs(lp - plain_lp) < 1e-5 and greedy == plain_greedy
    assert shared_tokens < plain.work["tokens"]  # each question's context ran once, not once per answer


def test_a_one_token_continuation_beside_a_longer_one_scores_as_the_hf_model_does(tiny_dir):
    """``(context A, [x])`` beside ``(A[:-1], [A[-1], y])``: both inputs are ``A``. lm-eval 0.4.13's HFLM groups them
    (its one-token-continuation cache keys on context + continuation[:-1]) and scores ``x`` at the first of the
    longer request's two positions, so its number for ``x`` changes when the other request is present. The reference
    here is the Hugging Face model's own log-softmax after ``A``, computed directly."""
    from transformers import AutoModelForCausalLM

    from lightning_llm.evaluation import HarnessLM

    ours = HarnessLM(str(tiny_dir), batch_size=4, device="cpu")
    a, x = ours._encode_pair("the quick brown fox jumps over the lazy", " dog")
    b, y = ours._encode_pair("the quick brown fox jumps over the", " lazy dog")
    assert a == b + y[:1]  # the two inputs are the same tokens
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([a])).logits[0, -1].double(), -1)
    alone = ours._loglikelihood_tokens([(("a", "x"), a, x)])[0][0]
    together = ours._loglikelihood_tokens([(("a", "x"), a, x), (("b", "y"), b, y)])[0][0]
    assert abs(alone - float(logp[x[0]])) < 1e-4 and abs(together - alone) < 1e-5


def test_generation_stops_when_every_row_has_met_a_stop_sequence(tiny_dir):
    """Stop strings end a batch early (fewer decoding steps than max_gen_toks) with HFLM's exact generations."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lightning_llm.evaluation import HarnessLM

    kwargs = {"until": ["the"], "max_gen_toks": 24, "do_sample": False}
    prompts = ["the quick brown fox jumps over", "she sells sea shells by", "all that glitters is", "every good boy"]
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    ours = HarnessLM(str(tiny_dir), batch_size=4, device="cpu")
    got = ours.generate_until(requests)
    ref = HFLM(pretrained=str(tiny_dir), batch_size=4, device="cpu").generate_until(
        [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    )
    assert got == ref
    assert any(text.strip() for text in got)
    assert ours.work["batches"] == 1 and ours.work["decode_steps"] < 24 - 1  # stopped before max_gen_toks


def test_stop_test_flags_each_row_at_the_step_its_text_first_holds_a_stop(tiny_dir, monkeypatch):
    """``generate``'s ``stop`` hook, called as ``generate`` calls it (after every step, on the tokens so far, with the
    rows stopped earlier marked finished), against the plain definition: a row stops at the first step where its
    whole decoded text contains a stop string. Stops spanning tokens, a row finished from the start (never flagged),
    60 tokens after a stop (beyond the decoded window); the same with a tokenizer without the Rust backend that
    decodes all rows in one call."""
    from lightning_llm.evaluation import HarnessLM

    lm = HarnessLM(str(tiny_dir), batch_size=4, device="cpu")
    stops = ["on the", "\n"]
    texts = ["the rain in spain", " falls mainly on the plain", "a\nb", " sea shells by the sea", "on the way"]
    rows = [lm.tok_encode(t, add_special_tokens=False) for t in texts]
    x = lm.tok_encode(" x", add_special_tokens=False)
    width = max(map(len, rows)) + 60
    responses = torch.tensor([(r + x * width)[:width] for r in rows])

    def first_stops():  # the plain definition: the first prefix whose text holds a stop, per row
        return [
            next((t for t in range(1, width + 1) if any(s in lm.tok_decode(r[:t]) for s in stops)), None)
            for r in responses.tolist()
        ]

    def run(hook):
        finished = torch.tensor([False, False, False, False, True])  # the last row stopped before the first step
        at = [None] * 5
        for t in range(1, width + 1):
            for r, hit in enumerate(hook(responses[:, :t], finished.clone())):
                if hit:
                    assert not finished[r]
                    at[r] = t
                    finished[r] = True
        return at

    want = first_stops()
    assert [w is not None for w in want] == [False, True, True, False, True]
    want[4] = None  # finished before the first step: never flagged
    assert run(lm._stop_test(stops)) == want
    monkeypatch.setattr(type(lm.tokenizer), "backend", property(lambda self: None))
    assert lm._decode_many([rows[0]]) == [lm.tok_decode(rows[0])]
    assert run(lm._stop_test(stops)) == want


def test_generation_through_generate_and_its_compiled_step_matches_hflm(tiny_dir, monkeypatch):
    """``generate_until`` decodes with ``nn.generation.generate`` (its ``stop`` hook ends rows at multi-character stop
    strings) and, with ``compile=True``, with its compiled decode step: HFLM's generations either way, over uneven
    batches (3 + 2 rows) where rows stop at a one-token stop, at a stop spanning tokens ("on the") or at EOS."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import lightning_llm.nn.generation as generation
    from lightning_llm.evaluation import HarnessLM

    kwargs = {"until": ["sea", "on the"], "max_gen_toks": 10, "do_sample": False}
    prompts = ["she sells", "the rain", "a stitch in time", "all that", "the early bird catches the"]

    def requests():
        return [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]

    ref = HFLM(pretrained=str(tiny_dir), batch_size=3, device="cpu").generate_until(requests())
    assert ref[:2] == [" ", " in spain falls mainly "]  # cut at "sea" and at "on the"
    calls = []
    original = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **kw: calls.append(kw["stop"]) or original(*a, **kw))
    assert HarnessLM(str(tiny_dir), batch_size=3, device="cpu").generate_until(requests()) == ref
    assert len(calls) == 2 and all(callable(stop) for stop in calls)
    monkeypatch.setattr(generation, "_COMPILE_BACKEND", "aot_eager")  # the traced graph, without a C++ build
    monkeypatch.setattr(generation, "_compiled_steps", {})
    torch._dynamo.reset()
    compiled = HarnessLM(str(tiny_dir), batch_size=3, device="cpu", compile=True)
    assert compiled.generate_until(requests()) == ref
    assert "cpu" in generation._compiled_steps and generation._compile_error is None
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compile"):
        HarnessLM(str(tiny_dir), device="cpu", compile="yes")


def test_distributed_argument_errors(tiny_dir):
    from lightning_llm.evaluation import HarnessLM

    with pytest.raises(ValueError, match="distributed"):
        HarnessLM(str(tiny_dir), device="cpu", distributed="yes")
    with pytest.raises(ValueError, match="torchrun"):  # no process group and not launched by torchrun
        HarnessLM(str(tiny_dir), device="cpu", distributed=True)
    lm = HarnessLM(str(tiny_dir), device="cpu", distributed=False)
    assert (lm.rank, lm.world_size) == (0, 1)


def test_sampling_is_seeded_per_batch(tiny_dir):
    """``do_sample: true``: the same seed gives the same samples (each batch has its own generator, so a batch's
    draws do not depend on which batches ran before it, or on which rank), another seed other samples."""
    from lm_eval.api.instance import Instance

    from lightning_llm.evaluation import HarnessLM

    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    prompts = ["the quick brown", "she sells", "a stitch in", "the rain in spain"]

    def sample(seed: int, batch_size: int) -> list[str]:
        lm = HarnessLM(str(tiny_dir), batch_size=batch_size, device="cpu", seed=seed)
        return lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)])

    first = sample(1, 2)
    assert sample(1, 2) == first
    assert sample(2, 2) != first
    assert len(set(first)) > 1


def test_a_shared_few_shot_beginning_runs_once_and_scores_like_hflm(tiny_dir, monkeypatch):
    """Requests whose contexts begin with the same few-shot text (the harness's ``first_n`` sampler, a description),
    in the three ways HarnessLM runs them: one-token answers (``_score``: the shared columns run once as one row,
    read by the whole batch through a ``SharedPrefixCache``), multi-token answers (``_score_contexts``: the contexts'
    prefill shares them) and generation (``generate``'s prefill). HFLM's scores (1e-4) and greedy flags, HFLM's
    generations, and fewer positions run than with sharing off."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import lightning_llm.evaluation.harness as harness
    import lightning_llm.nn.generation as generation
    from lightning_llm.evaluation import HarnessLM

    shots = "the quick brown fox jumps over the lazy dog. she sells sea shells by the sea shore. all that glitters is "
    questions = ["a stitch in time", "the early bird catches", "every good boy", "the rain in spain falls"]
    lm = HarnessLM(str(tiny_dir), batch_size=4, device="cpu")
    prefix = lm.tok_encode(shots)
    assert 20 <= len(prefix) <= 40  # within the tiny model's 64 positions with a question and an answer
    one = [((q, "a"), prefix + lm.tok_encode(q), lm.tok_encode(" saves")[:1]) for q in questions]
    multi = [((q, w), prefix + lm.tok_encode(q), lm.tok_encode(w)) for q in questions for w in (" nine", " the sea")]
    reference = HFLM(pretrained=str(tiny_dir), batch_size=4, device="cpu")
    default = generation.SHARED_PREFIX_MIN_TOKENS

    def run(requests, share: bool):
        limit = default if share else 10**9
        monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_TOKENS", limit)
        monkeypatch.setattr(harness, "SHARED_PREFIX_MIN_TOKENS", limit)
        ours = HarnessLM(str(tiny_dir), batch_size=4, device="cpu")
        shapes = []
        hook = ours.module.wte.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
        got = ours._loglikelihood_tokens(requests)
        hook.remove()
        return got, ours.work["tokens"], shapes

    for requests in (one, multi):
        got, tokens, shapes = run(requests, share=True)
        plain, plain_tokens, _ = run(requests, share=False)
        ref = reference._loglikelihood_tokens(requests)
        for (lp, greedy), (ref_lp, ref_greedy) in zip(got, ref, strict=True):
            assert abs(lp - ref_lp) < 1e-4 and greedy == ref_greedy, (lp, ref_lp)
        for (lp, greedy), (plain_lp, plain_greedy) in zip(got, plain, strict=True):
            assert abs(lp - plain_lp) < 1e-5 and greedy == plain_greedy
        assert shapes[0][0] == 1 and shapes[0][1] >= len(prefix) - 1  # the shared beginning, once, as one row
        assert tokens < plain_tokens - 2 * len(prefix)
    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_TOKENS", default)
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (shots + q, dict(kwargs)), i) for i, q in enumerate(questions)]
    shapes = []
    hook = lm.module.wte.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    texts = lm.generate_until(requests)
    hook.remove()
    assert shapes[0][0] == 1 and shapes[0][1] >= len(prefix) - 1
    ref_texts = reference.generate_until(
        [Instance("generate_until", {}, (shots + q, dict(kwargs)), i) for i, q in enumerate(questions)]
    )
    assert texts == ref_texts and any(t.strip() for t in texts)
