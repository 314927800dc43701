"""Preference / prompt data modules and the embedded synthetic tasks."""

import json

import pytest
import torch

from lightning_llm.data.preference import (
    ChatTemplate,
    PreferenceDataModule,
    collate_preference,
    encode_pair,
    to_text_example,
)
from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.data.synthetic import (
    SYNTHETIC_CHARS,
    TargetCharReward,
    char_tokenizer,
    synthetic_preference_examples,
    synthetic_prompts,
)


def test_synthetic_task_is_deterministic_and_consistent():
    a, b = synthetic_preference_examples(50, seed=3), synthetic_preference_examples(50, seed=3)
    assert a == b and a != synthetic_preference_examples(50, seed=4)
    for ex in a:
        kc, kr = ex["chosen"].count("a"), ex["rejected"].count("a")
        assert kc - kr >= 2 and len(ex["chosen"]) == len(ex["rejected"]) == 8
        assert ex["margin"] == pytest.approx((kc - kr) / 8)
        assert ex["prompt"].endswith(">") and 4 <= len(ex["prompt"]) <= 7
    assert synthetic_prompts(5, 1) == synthetic_prompts(5, 1)


def test_char_tokenizer_round_trip_and_fixed_ids():
    tok = char_tokenizer()
    assert tok.eos_id == tok.pad_id == 0
    text = "abch>gf"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids + [tok.eos_id]) == text
    # the vocabulary is the sorted character set after the two special tokens
    assert tok.vocab_size == len(set(SYNTHETIC_CHARS)) + 2
    assert ids[0] == 2 + sorted(set(SYNTHETIC_CHARS)).index("a")
    assert char_tokenizer().fingerprint == tok.fingerprint


def test_target_char_reward_hand_values():
    fn = TargetCharReward("a", length=4)
    # "aab" -> 2/4; "aaaaaa" -> capped at 4/4; "" -> 0
    assert fn(prompts=["x", "y", "z"], completions=["aab", "aaaaaa", ""]) == [0.5, 1.0, 0.0]


def test_preference_collate_masks():
    items = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 0], "rejected_ids": [8, 8, 0], "index": 0, "margin": 1.0},
        {"prompt_ids": [5], "chosen_ids": [9, 9, 9, 0], "rejected_ids": [0], "index": 1, "margin": 0.5},
    ]
    b = collate_preference(items, pad_id=0)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 5)
    assert b["chosen_input_ids"][0].tolist() == [5, 6, 7, 0, 0]
    assert b["chosen_attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    assert b["chosen_loss_mask"][0].tolist() == [0, 0, 1, 1, 0]
    assert b["rejected_loss_mask"][1].tolist() == [0, 1, 0, 0, 0]
    assert b["margin"].tolist() == [1.0, 0.5] and b["index"].tolist() == [0, 1]


def test_conversational_and_implicit_prompt_via_trl():
    template = ChatTemplate()
    conv = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    # default template: "{role}: {content}\n" per message, generation prompt "assistant: "; the whole conversations
    # are kept (they are what is encoded), the completions are the text after the shared part
    assert to_text_example(conv, template) == {
        "prompt": "user: hi\nassistant: ",
        "chosen": "good\n",
        "rejected": "bad\n",
        "prompt_chosen": "user: hi\nassistant: good\n",
        "prompt_rejected": "user: hi\nassistant: bad\n",
    }
    implicit = {"chosen": "Q: x A: good", "rejected": "Q: x A: bad", "margin": 2}
    assert to_text_example(implicit, template) == {
        "prompt": "Q: x A:",
        "chosen": " good",
        "rejected": " bad",
        "margin": 2.0,
    }
    with pytest.raises(ValueError, match="chosen"):
        to_text_example({"prompt": "p", "chosen": "c"}, template)


def test_encode_pair_char_tokenizer_rules():
    """Our char tokenizer (GPT-2-like: no BOS, nothing added): eos appended as text once, completion split at the
    first differing token, the length rules of DPOTrainer ('keep_start') and RewardTrainer ('filter')."""
    tok = char_tokenizer(texts=["user: assistant: abcd>\n"])
    ex = {"prompt": "ab>", "chosen": "cc", "rejected": "d<|endoftext|>"}  # rejected already ends with eos
    out = encode_pair(ex, tok)
    assert out["prompt_ids"] == tok.encode("ab>")  # no BOS
    assert out["chosen_ids"] == tok.encode("cc") + [tok.eos_id]
    assert out["rejected_ids"] == tok.encode("d") + [tok.eos_id]  # not doubled
    assert encode_pair(ex, tok, max_length=5)["chosen_ids"] == tok.encode("cc")  # cut to 5 tokens in all
    assert encode_pair(ex, tok, max_length=3) is None  # the prompt fills max_length: dropped
    assert encode_pair(ex, tok, max_length=5, truncation_mode="filter") is None  # 3 + 3 > 5: dropped
    assert encode_pair(ex, tok, max_length=6, truncation_mode="filter")["chosen_ids"] == out["chosen_ids"]
    assert encode_pair(ex, tok, max_prompt_length=2)["prompt_ids"] == tok.encode("b>")  # keeps the end
    # a chat example is encoded from the whole rendered conversations, without appending eos
    chat = to_text_example(
        {
            "prompt": [{"role": "user", "content": "ab"}],
            "chosen": [{"role": "assistant", "content": "cc"}],
            "rejected": [{"role": "assistant", "content": "d"}],
        },
        ChatTemplate(),
    )
    enc = encode_pair(chat, tok)
    assert tok.token_to_id("<unk>") not in enc["prompt_ids"] + enc["chosen_ids"]
    assert enc["prompt_ids"] + enc["chosen_ids"] == tok.encode("user: ab\nassistant: cc\n")
    assert enc["prompt_ids"] == tok.encode("user: ab\nassistant: ")


def test_preference_datamodule_bad_lengths():
    with pytest.raises(ValueError, match="truncation_mode"):
        PreferenceDataModule(truncation_mode="keep_end")
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length"):
        PreferenceDataModule(max_length=0)


def test_preference_datamodule_from_jsonl(tmp_path):
    rows = [{"prompt": f"q{i} ", "chosen": "yes yes", "rejected": "no"} for i in range(20)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = PreferenceDataModule(
        dataset=str(path), tokenizer="char", val_fraction=0.2, batch_size=4, max_length=16, max_prompt_length=8
    )
    dm.setup("fit")
    assert len(dm.dataset("train")) == 16 and len(dm.dataset("val")) == 4
    b = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    row = b["chosen_input_ids"][0][b["chosen_loss_mask"][0].bool()].tolist()
    assert tok.decode(row) == "yes yes" and row[-1] == tok.eos_id
    assert "margin" not in b


def test_prompt_datamodule_sources(tmp_path):
    dm = PromptDataModule(prompts=["ab>", "cd>", "ef>", "gh>"], tokenizer="char", val_fraction=0.25, batch_size=2)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"prompt", "prompt_ids"} and len(b["prompt"]) == 2
    assert [dm.tokenizer.decode(p) for p in b["prompt_ids"]] == b["prompt"]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"question": [{"role": "user", "content": f"q{i}"}]}) for i in range(10)))
    dm2 = PromptDataModule(dataset=str(path), prompt_field="question", tokenizer="char", batch_size=3)
    assert dm2.texts()["train"][0].endswith("assistant: ")
    synth = PromptDataModule(num_train=10, num_val=4, batch_size=4)
    assert synth.vocab_size == char_tokenizer().vocab_size
    assert len(synth.dataset("val")) == 4
    with pytest.raises(TypeError, match="prompts"):
        PromptDataModule(prompts="just one string")
    assert torch.is_tensor(torch.tensor(synth.dataset("train")[0]["prompt_ids"]))
