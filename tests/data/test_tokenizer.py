"""Tokenizer: byte-level BPE training, round trip, parity with transformers, save/load, cache, errors."""

from __future__ import annotations

import json
import sys

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lightning_llm.data.tokenizer import EOS_TOKEN, SPECIAL_IDS_FILE, Tokenizer, load_tokenizer

SAMPLE = 'Hello  world!\n\n\tIndented "quotes" \u2014 caf\u00e9 \U0001f600 end.  '


def test_trained_bpe_shape(small_bpe):
    assert small_bpe.vocab_size == 512
    assert small_bpe.eos_id == small_bpe.pad_id == small_bpe.token_to_id(EOS_TOKEN) == 0
    assert small_bpe.bos_id is None
    # byte-level: every one of the 256 byte symbols is in the vocabulary, so nothing is unknown
    assert all(small_bpe.token_to_id(ch) is not None for ch in tokenizers.pre_tokenizers.ByteLevel.alphabet())


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200).filter(lambda s: EOS_TOKEN not in s))
def test_round_trip_any_text(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text


def test_encode_matches_transformers_and_adds_no_special_tokens(small_bpe):
    # Reference: the same tokenizer through transformers' fast tokenizer, with add_special_tokens=False.
    hf = PreTrainedTokenizerFast(tokenizer_object=small_bpe.backend, eos_token=EOS_TOKEN)
    assert small_bpe.encode(SAMPLE) == hf(SAMPLE, add_special_tokens=False)["input_ids"]
    texts = [SAMPLE, "a", "", "second document"]
    assert small_bpe.encode_batch(texts) == [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = small_bpe.encode(SAMPLE, add_eos=True)
    assert ids[-1] == small_bpe.eos_id and ids[:-1] == small_bpe.encode(SAMPLE)
    assert small_bpe.decode(ids) == SAMPLE and small_bpe.decode(ids, skip_special_tokens=False) == SAMPLE + EOS_TOKEN


def test_save_load_and_autotokenizer(small_bpe, tmp_path):
    small_bpe.save(tmp_path)
    assert {"tokenizer.json", SPECIAL_IDS_FILE, "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / SPECIAL_IDS_FILE).read_text())["eos_id"] == small_bpe.eos_id
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == small_bpe.fingerprint
    assert (loaded.eos_id, loaded.bos_id, loaded.pad_id, loaded.vocab_size) == (0, None, 0, 512)
    assert loaded.encode(SAMPLE) == small_bpe.encode(SAMPLE)
    assert Tokenizer.from_pretrained(tmp_path).fingerprint == small_bpe.fingerprint
    # The saved directory is a valid Hugging Face tokenizer too.
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == small_bpe.eos_id
    assert hf(SAMPLE, add_special_tokens=False)["input_ids"] == small_bpe.encode(SAMPLE)


def test_to_str_from_str(small_bpe):
    restored = Tokenizer.from_str(small_bpe.to_str(), **small_bpe.special_ids)
    assert restored.fingerprint == small_bpe.fingerprint
    assert Tokenizer.from_str(small_bpe.to_str()).eos_id == small_bpe.eos_id  # eos found by name
    assert tokenizers.Tokenizer.from_str(small_bpe.to_str()).encode(SAMPLE).ids == small_bpe.encode(SAMPLE)


def test_fingerprint_is_stable_and_discriminates(train_docs, small_bpe):
    again = Tokenizer.train_bpe(train_docs, vocab_size=512)
    assert again.fingerprint == small_bpe.fingerprint
    assert Tokenizer.train_bpe(train_docs[:200], vocab_size=512).fingerprint != small_bpe.fingerprint


def _llama_like_dir(small_bpe, tmp_path):
    """A Hugging Face tokenizer directory whose post-processor adds BOS, with distinct bos/eos/pad tokens."""
    backend = tokenizers.Tokenizer.from_str(small_bpe.backend.to_str())
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.save_pretrained(str(tmp_path))
    return hf


def test_from_pretrained_hf_directory_with_bos(small_bpe, tmp_path):
    hf = _llama_like_dir(small_bpe, tmp_path)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.vocab_size == len(hf) == 515
    assert hf(SAMPLE)["input_ids"][0] == hf.bos_token_id  # the HF default adds BOS ...
    assert tok.encode(SAMPLE) == hf(SAMPLE, add_special_tokens=False)["input_ids"]  # ... ours never does
    assert tok.encode(SAMPLE, add_bos=True) == hf(SAMPLE)["input_ids"]


def test_from_pretrained_without_transformers(small_bpe, tmp_path, monkeypatch):
    hf = _llama_like_dir(small_bpe, tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.encode(SAMPLE) == hf(SAMPLE, add_special_tokens=False)["input_ids"]
    with pytest.raises(ImportError, match="transformers"):
        Tokenizer.from_pretrained("some-org/some-hub-tokenizer")


def test_source_is_the_directory_it_was_read_from(small_bpe, tmp_path):
    """``Tokenizer.source``: where files beside the tokenizer (a chat template) are looked up."""
    assert small_bpe.source is None  # trained in memory
    ours, hf_dir = tmp_path / "ours", tmp_path / "hf"
    small_bpe.save(ours)
    _llama_like_dir(small_bpe, hf_dir)
    assert Tokenizer.load(ours).source == str(ours)
    assert Tokenizer.from_pretrained(ours).source == str(ours)
    assert Tokenizer.from_pretrained(str(hf_dir)).source == str(hf_dir)
    assert Tokenizer.from_pretrained(hf_dir / "tokenizer.json").source == str(hf_dir)


def test_load_tokenizer_cache_hit(train_docs, tmp_path, monkeypatch):
    docs = train_docs[:300]
    first = load_tokenizer(None, docs, vocab_size=400, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(Tokenizer, "train_bpe", fail)
    second = load_tokenizer(None, iter(docs), vocab_size=400, cache_dir=tmp_path)  # any iterable
    assert second.fingerprint == first.fingerprint
    monkeypatch.undo()
    other = load_tokenizer(None, docs, vocab_size=300, cache_dir=tmp_path)  # new key -> new entry
    assert other.vocab_size == 300 and len(list((tmp_path / "tokenizers").iterdir())) == 2
    assert not list(tmp_path.rglob("*.tmp"))
    assert load_tokenizer(first) is first
    assert load_tokenizer(str(next((tmp_path / "tokenizers").iterdir()))).vocab_size in (300, 400)


def test_errors(small_bpe, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_bpe([], vocab_size=300)
    with pytest.raises(TypeError, match="single str"):
        Tokenizer.train_bpe("abc abc", vocab_size=300)
    with pytest.raises(ValueError, match="no BOS"):
        small_bpe.encode("x", add_bos=True)
    with pytest.raises(TypeError, match="str"):
        small_bpe.encode(["x"])
    with pytest.raises(TypeError, match="single str"):
        small_bpe.encode_batch("x")
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="eos_id"):
        Tokenizer(small_bpe.backend, eos_id=10_000)
    with pytest.raises(ValueError, match="train_texts"):
        load_tokenizer(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="could not be loaded"):
        Tokenizer.from_pretrained(str(tmp_path / "junk"))
