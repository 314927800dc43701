"""HarnessLM with chat templates (``simple_evaluate(apply_chat_template=True)``) against the harness's own HFLM.

The reference is ``lm_eval.models.huggingface.HFLM`` on the same tiny saved GPT-2 (``test_harness.build_tiny_gpt2``)
whose ``tokenizer_config.json`` carries a Jinja chat template: HFLM renders the conversations with
``transformers``' ``apply_chat_template``. With few-shot examples as earlier turns and a system instruction, every
rendered prompt must be the same string on both sides, and the scores and generations the same as well. A template
that rejects the system role is retried without it, as HFLM does. Without a template, HarnessLM renders the format the
project's data modules train on (its expected text is written out by hand below).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_harness import build_tiny_gpt2, write_tasks  # noqa: E402

#: one letter of the role, the message, the eos token (a template variable), then the assistant's turn opened
TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}> {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}a>{% endif %}"
)
#: the same, but the system role is refused (as some models' templates do)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ m['role'][0] }}> {{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}a>{% endif %}"
)
CHAT_TASKS = ["tiny_mc", "tiny_gen"]


def _with_template(source: Path, target: Path, template: str) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness_chat")
    plain = build_tiny_gpt2(root / "plain", steps=60)
    return {
        "plain": plain,
        "chat": _with_template(plain, root / "chat", TEMPLATE),
        "no_system": _with_template(plain, root / "no_system", NO_SYSTEM),
        "tasks": write_tasks(root / "tasks"),
    }


def _run(model, task_dir: Path, system: str | None = "be brief") -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        tasks=CHAT_TASKS,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        num_fewshot=1,
        system_instruction=system,
    )


def _samples(res: dict, task: str, field: str) -> list:
    return [s[field] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("kind", ["chat", "no_system"])
def test_chat_prompts_and_results_equal_hflms(dirs, kind):
    from lm_eval.models.huggingface import HFLM

    from lightning_llm.evaluation import HarnessLM

    ref = _run(HFLM(pretrained=str(dirs[kind]), batch_size=4, device="cpu"), dirs["tasks"])
    ours = _run(HarnessLM(str(dirs[kind]), batch_size=4, device="cpu"), dirs["tasks"])
    for task in CHAT_TASKS:
        prompts = _samples(ours, task, "arguments")
        assert prompts == _samples(ref, task, "arguments"), task  # the same rendered strings
        context = prompts[0][0][0]
        assert context.endswith("a>") and "<|endoftext|>u> " in context  # the template was applied, few-shot as turns
        assert context.startswith("s> be brief") == (kind == "chat")  # the system turn, or dropped on refusal
        for key, value in ref["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6), (task, key)
    for r, o in zip(_samples(ref, "tiny_mc", "resps"), _samples(ours, "tiny_mc", "resps"), strict=True):
        for (r_ll, r_greedy), (o_ll, o_greedy) in zip((x[0] for x in r), (x[0] for x in o), strict=True):
            assert abs(o_ll - r_ll) < 1e-4 and o_greedy == r_greedy
    assert _samples(ours, "tiny_gen", "resps") == _samples(ref, "tiny_gen", "resps")


def test_without_a_template_the_data_modules_format_is_used(dirs):
    """Our own tokenizer carries no template: the format SFTDataModule trains on (written out here by hand)."""
    from lightning_llm.evaluation import HarnessLM

    lm = HarnessLM(str(dirs["plain"]), batch_size=4, device="cpu")
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2 + 2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3 + 3"},
    ]
    assert lm.apply_chat_template(history) == "system: be brief\nuser: 2 + 2\nassistant: 4\nuser: 3 + 3\nassistant: "
    # add_generation_prompt=False continues the last (assistant) message, as HFLM's continue_final_message
    assert (
        lm.apply_chat_template(history[:3], add_generation_prompt=False)
        == "system: be brief\nuser: 2 + 2\nassistant: 4"
    )
    assert lm.chat_template(False) is None
    assert "message['role']" in lm.chat_template(True)  # the default format as a Jinja template, for the record


def test_an_explicit_template_wins_over_the_tokenizers(dirs):
    from lightning_llm.evaluation import HarnessLM

    lm = HarnessLM(str(dirs["chat"]), batch_size=4, device="cpu", chat_template="{{ messages[-1]['content'] }}!")
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    assert lm.chat_template(True) == "{{ messages[-1]['content'] }}!"
    with pytest.raises(ValueError, match="chat_template"):
        HarnessLM(str(dirs["chat"]), batch_size=4, device="cpu", chat_template=3)


def test_evaluate_harness_part_applies_the_chat_template(dirs, tmp_path):
    """``evaluate(harness={"apply_chat_template": true, ...})``: the harness part renders conversations with the
    tokenizer's own template, and the report records it."""
    from lightning_llm.evaluation import HarnessPart, evaluate

    off = {"enabled": False}
    parts = ("perplexity", "lambada", "multiple_choice", "robustness", "fairness", "efficiency", "bias", "embeddings")
    common = dict(out=None, device="cpu", plots=False, verbose=False, **{p: off for p in parts})
    harness = dict(enabled=True, tasks=("tiny_mc",), include_path=str(dirs["tasks"]), limit=6, num_fewshot=1)
    chat = evaluate(str(dirs["chat"]), harness=HarnessPart(**harness, apply_chat_template=True), **common)
    part = chat["parts"]["harness"]
    assert part["status"] == "ok", part.get("error")
    assert part["chat_template"] == TEMPLATE
    plain = evaluate(str(dirs["chat"]), harness=HarnessPart(**harness), **common)["parts"]["harness"]
    assert plain["status"] == "ok" and plain["chat_template"] is None
    with pytest.raises(ValueError, match="apply_chat_template"):
        HarnessPart(**harness, apply_chat_template="yes")


def test_evaluate_reads_a_named_tokenizer_once_and_its_chat_template(dirs, monkeypatch):
    """``evaluate(model, tokenizer=DIR, harness=...)`` with the template only in DIR (the model directory has none):
    the tokenizer is loaded once (before, the harness part loaded it a second time to find the template), and the
    harness part still renders with DIR's template, which it finds through ``Tokenizer.source``."""
    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.evaluation import HarnessPart, evaluate

    loads = []
    real = Tokenizer.from_pretrained.__func__

    def counting(cls, path_or_name):
        loads.append(str(path_or_name))
        return real(cls, path_or_name)

    monkeypatch.setattr(Tokenizer, "from_pretrained", classmethod(counting))
    off = {"enabled": False}
    parts = ("perplexity", "lambada", "multiple_choice", "robustness", "fairness", "efficiency", "bias", "embeddings")
    harness = HarnessPart(enabled=True, tasks=("tiny_mc",), include_path=str(dirs["tasks"]), limit=4,
                          apply_chat_template=True)  # fmt: skip
    report = evaluate(str(dirs["plain"]), tokenizer=str(dirs["chat"]), harness=harness, out=None, device="cpu",
                      plots=False, verbose=False, **{p: off for p in parts})  # fmt: skip
    part = report["parts"]["harness"]
    assert part["status"] == "ok", part.get("error")
    assert part["chat_template"] == TEMPLATE
    assert loads == [str(dirs["chat"])]
    assert Tokenizer.from_pretrained(dirs["chat"]).source == str(dirs["chat"])
