"""SFT data: tokenization and loss masks equal TRL 1.16's ``SFTTrainer._prepare_dataset`` token by token; assistant
masks equal ``transformers``' ``return_assistant_tokens_mask``; packing; file formats; errors."""

from __future__ import annotations

import json
import types

import pytest
import torch

from lightning_llm.data.preference import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lightning_llm.data.sft import (
    INSTRUCTION_CHARS,
    SFTDataModule,
    collate_sft,
    instruction_examples,
    pack_examples,
    tokenize_sft_example,
)
from lightning_llm.data.synthetic import char_tokenizer
from lightning_llm.ops import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

# renders exactly as DEFAULT_CHAT_TEMPLATE, with the assistant's content marked for return_assistant_tokens_mask
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}\n{% endgeneration %}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(chars=INSTRUCTION_CHARS + ".?!")


@pytest.fixture(scope="module")
def hf_tok(tok):
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def _trl_prepare(rows, hf_tok, tmp_path, completion_only_loss=True, max_length=64):
    """TRL's own dataset preparation (the real method, on a stand-in for the trainer's few attributes)."""
    import datasets
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    fake = types.SimpleNamespace(_tokenizer=hf_tok, completion_only_loss=completion_only_loss, chat_template=None)
    out = SFTTrainer._prepare_dataset(fake, datasets.Dataset.from_list(rows), hf_tok, args, False, None, "train")
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in out]


PLAIN_PC = [{"prompt": "reverse: abc\n", "completion": "cba"}, {"prompt": "copy: hg ", "completion": "hg."}]
PLAIN_TEXT = [{"text": "hello there"}, {"text": "a b c<|endoftext|>"}]
MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi?"},
            {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "sort: cab"},
            {"role": "assistant", "content": "abc"},
        ]
    }
]


@pytest.mark.parametrize(
    ("rows", "completion_only"),
    [
        (instruction_examples(6, 3), True),  # conversational prompt-completion
        (instruction_examples(6, 4, conversational=False), True),  # plain prompt-completion: eos text appended
        (PLAIN_PC, True),
        (PLAIN_PC, False),
        (PLAIN_TEXT, True),
        (MESSAGES, True),
    ],
)
def test_tokenization_equals_trl(rows, completion_only, tok, hf_tok, tmp_path):
    from lightning_llm.data.sft import truncate_example

    ours = [tokenize_sft_example(r, tok, ChatTemplate(), completion_only_loss=completion_only) for r in rows]
    ours = [it for it in (truncate_example(o, 64, "keep_start") for o in ours) if it is not None]
    assert ours == _trl_prepare(rows, hf_tok, tmp_path, completion_only, max_length=64)


def test_assistant_mask_equals_transformers_generation_mask(tok, hf_tok):
    """Our template-agnostic assistant mask == transformers' {% generation %} mask, token by token."""
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    hf_tok.chat_template = GENERATION_TEMPLATE
    template = ChatTemplate(GENERATION_TEMPLATE, {"eos_token": "<|endoftext|>"})
    assert template.apply_chat_template(MESSAGES[0]["messages"]) == ChatTemplate().apply_chat_template(
        MESSAGES[0]["messages"]
    )
    for row in [
        *MESSAGES,
        {"messages": instruction_examples(1, 7)[0]["prompt"] + [{"role": "assistant", "content": "x"}]},
    ]:
        ref = hf_tok.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ours = tokenize_sft_example(row, tok, template, assistant_only_loss=True)
        assert ours["input_ids"] == list(ref["input_ids"])
        expected = [t if m else IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
        assert ours["labels"] == expected
        assert any(m for m in ref["assistant_masks"])


def test_collate_shifts_labels_and_packs(tok):
    items = [tokenize_sft_example(r, tok, ChatTemplate()) for r in instruction_examples(5, 1)]
    batch = collate_sft(items, tok.pad_id)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == it["input_ids"]
        assert batch["targets"][i, : n - 1].tolist() == it["labels"][1:]  # targets[t] = labels[t + 1]
        assert (batch["targets"][i, n - 1 :] == IGNORE_INDEX).all()
    rows = pack_examples(items, 128)
    assert sorted(len(ex["input_ids"]) for row in rows for ex in row) == sorted(len(it["input_ids"]) for it in items)
    assert all(sum(len(ex["input_ids"]) for ex in row) <= 128 for row in rows)
    assert len(rows) < len(items)
    packed = collate_sft(rows, tok.pad_id)
    row, exs = packed, rows[0]
    start = 0
    for j, ex in enumerate(exs):
        n = len(ex["input_ids"])
        assert row["position_ids"][0, start : start + n].tolist() == list(range(n))
        assert (row["segment_ids"][0, start : start + n] == j).all()
        assert row["targets"][0, start + n - 1] == IGNORE_INDEX  # no prediction across the example boundary
        start += n


def test_data_module_files_and_formats(tmp_path):
    rows = [{"prompt": f"copy: {w}\n", "completion": w} for w in ("abc", "bca", "cab", "hhg", "dead", "beef")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import datasets

    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for path in (jsonl, parquet):
        dm = SFTDataModule(dataset=str(path), tokenizer="char", val_fraction=0.34, max_length=32, batch_size=2)
        dm.setup("fit")
        assert len(dm.dataset("train")) + len(dm.dataset("val")) == len(rows)
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == {"input_ids", "targets", "attention_mask"}
        assert (batch["targets"] != IGNORE_INDEX).any()


def test_embedded_task_and_packing_module():
    dm = SFTDataModule(num_train=64, num_val=16, max_length=48, batch_size=4, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert {"position_ids", "segment_ids"} <= set(batch)
    assert batch["input_ids"].shape[1] <= 48
    assert dm.tokenizer.vocab_size == len(INSTRUCTION_CHARS) + 2


def test_truncation_drops_fully_masked(tok):
    rows = [{"prompt": "a" * 30, "completion": "b"}]
    dm = SFTDataModule(dataset="instructions", max_length=8)  # only for its settings
    del dm
    item = tokenize_sft_example(rows[0], tok, ChatTemplate())
    from lightning_llm.data.sft import truncate_example

    assert truncate_example(item, 8, "keep_start") is None
    kept = truncate_example(item, 8, "keep_end")
    assert kept is not None and len(kept["input_ids"]) == 8


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="'prompt' \\+ 'completion', 'messages'.*text_field"):
        tokenize_sft_example({"question": "x", "answer": "y"}, tok, ChatTemplate())
    with pytest.raises(ValueError, match="assistant_only_loss=True` needs conversational"):
        tokenize_sft_example({"text": "abc"}, tok, ChatTemplate(), assistant_only_loss=True)
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_sft_example(
            {"messages": [{"role": "user", "content": "hi"}]}, tok, ChatTemplate(), assistant_only_loss=True
        )
    with pytest.raises(ValueError, match="truncation_mode"):
        SFTDataModule(truncation_mode="middle")
    with pytest.raises(ValueError, match="packing=True` needs `max_length"):
        SFTDataModule(packing=True, max_length=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SFTDataModule(dataset=str(tmp_path / "missing.jsonl")).setup("fit")
    hf_dir = tmp_path / "hf_tok"  # a Hugging Face tokenizer without a chat template, and messages to render
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|endoftext|>").save_pretrained(
        hf_dir
    )
    dm = SFTDataModule(tokenizer=str(hf_dir), num_train=8, num_val=2)
    with pytest.raises(ValueError, match="has no chat template. Pass `chat_template`"):
        dm.setup("fit")
    dm = SFTDataModule(tokenizer=str(hf_dir), num_train=8, num_val=2, chat_template=DEFAULT_CHAT_TEMPLATE)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 8
    assert torch.is_tensor(collate_sft([{"input_ids": [1, 2], "labels": [1, 2]}], 0)["input_ids"])
