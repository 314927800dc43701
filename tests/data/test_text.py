"""TextDataModule: sources, packing, shift, shuffling, caching, unigram baseline and errors."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import lightning_llm.data.text as text_module
from lightning_llm.data.corpus import embedded_documents
from lightning_llm.data.text import IGNORE_INDEX, PackedBlockDataset, TextDataModule
from lightning_llm.data.tokenizer import EOS_TOKEN, Tokenizer


@pytest.fixture(scope="module")
def embedded_dm(data_cache) -> TextDataModule:
    dm = TextDataModule("embedded", vocab_size=512, block_size=32, batch_size=4, cache_dir=data_cache)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _reference_stream(dm: TextDataModule, split: str) -> list[int]:
    """Independent packing: every document through transformers' fast tokenizer, eos between documents."""
    hf = PreTrainedTokenizerFast(tokenizer_object=dm.tokenizer.backend, eos_token=EOS_TOKEN)
    out: list[int] = []
    for i, doc in enumerate(dm.documents[split]):
        if i:
            out.append(hf.eos_token_id)
        out.extend(hf(doc, add_special_tokens=False)["input_ids"])
    return out


def test_vocab_size_available_before_setup(data_cache):
    dm = TextDataModule("embedded", vocab_size=300, block_size=16, cache_dir=data_cache)
    assert dm.vocab_size == dm.tokenizer.vocab_size == 300  # no setup() needed (CLI argument linking)
    assert dm.hparams.vocab_size == 300 and dm.hparams.tokenizer is None


def test_stream_and_blocks_match_naive_packing(embedded_dm):
    dm, t = embedded_dm, 32
    ref = _reference_stream(dm, "val")
    assert dm.token_stream("val").tolist() == ref
    loader = dm.val_dataloader()
    blocks = [b for batch in loader for b in zip(batch["input_ids"], batch["targets"])]
    # Naive reference: block i covers ref[i*T : i*T + T + 1]; the last one is padded with pad / -100.
    n_blocks = math.ceil((len(ref) - 1) / t)
    assert len(blocks) == n_blocks
    for i, (x, y) in enumerate(blocks):
        chunk = ref[i * t : i * t + t + 1]
        pad = t + 1 - len(chunk)
        assert x.tolist() == chunk[:-1] + [dm.tokenizer.pad_id] * pad
        assert y.tolist() == chunk[1:] + [IGNORE_INDEX] * pad
    scored = sum(int((y != IGNORE_INDEX).sum()) for _, y in blocks)
    assert scored == len(ref) - 1  # every token but the first is a target exactly once


def test_train_batches_shape_shift_and_seeded_shuffle(embedded_dm, data_cache):
    batch = next(iter(embedded_dm.train_dataloader()))
    assert set(batch) == {"input_ids", "targets"}
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 32)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])  # targets[t] = input[t + 1]
    assert (batch["targets"] != IGNORE_INDEX).all()  # train drops the partial block: no padding
    stream = embedded_dm.token_stream("train")
    assert len(embedded_dm._dataset("train")) == (stream.numel() - 1) // 32

    def first_batches(seed: int) -> list[torch.Tensor]:
        dm = TextDataModule("embedded", vocab_size=512, block_size=32, batch_size=4, cache_dir=data_cache, seed=seed)
        it = iter(dm.train_dataloader())
        return [next(it)["input_ids"] for _ in range(3)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    val1, val2 = next(iter(embedded_dm.val_dataloader())), next(iter(embedded_dm.val_dataloader()))
    assert torch.equal(val1["input_ids"], val2["input_ids"])
    assert val1["input_ids"][0].tolist() == embedded_dm.token_stream("val")[:32].tolist()  # val is in order


def test_max_blocks(data_cache):
    dm = TextDataModule(
        "embedded",
        vocab_size=512,
        block_size=32,
        batch_size=4,
        cache_dir=data_cache,
        max_train_blocks=6,
        max_eval_blocks=3,
    )
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == 6
    assert sum(b["input_ids"].shape[0] for b in dm.test_dataloader()) == 3


def test_stream_cache_hit_and_keys(tmp_path, monkeypatch):
    kwargs = dict(dataset="embedded", vocab_size=300, block_size=16, cache_dir=str(tmp_path))
    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    streams = {s: dm.token_stream(s).clone() for s in ("train", "val", "test")}
    cached = sorted(p.name for p in (tmp_path / "streams").iterdir())
    assert len(cached) == 3 and not list(tmp_path.rglob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded instead of loading the cache")

    monkeypatch.setattr(text_module, "pack_documents", fail)
    monkeypatch.setattr(Tokenizer, "train_bpe", fail)
    again = TextDataModule(**{**kwargs, "block_size": 8})  # the stream does not depend on the block size
    for s, tokens in streams.items():
        assert torch.equal(again.token_stream(s), tokens)
    monkeypatch.undo()
    other = TextDataModule(**{**kwargs, "vocab_size": 400})  # new tokenizer -> new streams
    other.prepare_data()
    assert len(list((tmp_path / "streams").iterdir())) == 6
    assert other.stream_cache_path("val") != dm.stream_cache_path("val")
    # A corrupt cache file is rebuilt, not trusted.
    path = dm.stream_cache_path("val")
    path.write_bytes(b"garbage")
    fresh = TextDataModule(**kwargs)
    assert torch.equal(fresh.token_stream("val"), streams["val"])


def test_local_txt_file(tmp_path, small_bpe):
    docs = [d.replace("\n\n", "\n") for d in embedded_documents()[:400]]  # one paragraph per document
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok_dir = small_bpe.save(tmp_path / "tok")
    dm = TextDataModule(str(path), tokenizer=str(tok_dir), block_size=16, cache_dir=str(tmp_path / "cache"))
    assert dm.vocab_size == 512 and dm.tokenizer.fingerprint == small_bpe.fingerprint
    got = dm.documents
    # Reference: paragraphs split by hand; each lands in exactly one split, none is lost.
    assert sorted(got["train"] + got["val"] + got["test"]) == sorted(docs)
    assert got["val"] and got["test"] and not set(got["val"]) & set(got["train"])
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (16, 16)
    # Editing the file changes the cache key.
    before = dm.stream_cache_path("train")
    path.write_text("\n\n".join(docs[::-1][:300]) + "\n", encoding="utf-8")
    assert (
        TextDataModule(str(path), tokenizer=str(tok_dir), cache_dir=str(tmp_path / "cache")).stream_cache_path("train")
        != before
    )


def test_local_jsonl_and_directory_splits(tmp_path, small_bpe):
    docs = embedded_documents()[:120]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)), encoding="utf-8")
    dm = TextDataModule(str(path), text_column="body", tokenizer=None, vocab_size=300, cache_dir=str(tmp_path / "c"))
    assert sorted(sum(dm.documents.values(), [])) == sorted(docs)
    with pytest.raises(ValueError, match=r"text_column.*\['body', 'id'\]"):
        _ = TextDataModule(str(path), cache_dir=str(tmp_path / "c")).documents
    # A directory with train/validation/test files: the given splits are used as they are.
    ddir = tmp_path / "ds"
    ddir.mkdir()
    for name, part in (("train", docs[:100]), ("validation", docs[100:110]), ("test", docs[110:])):
        (ddir / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in part), encoding="utf-8")
    dm = TextDataModule(str(ddir), tokenizer=str(small_bpe.save(tmp_path / "tok")), cache_dir=str(tmp_path / "c"))
    assert dm.documents == {"train": docs[:100], "val": docs[100:110], "test": docs[110:]}
    # Only a train split present: val and test are derived from it by hash.
    (ddir / "validation.jsonl").unlink()
    (ddir / "test.jsonl").unlink()
    dm = TextDataModule(str(ddir), tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    assert sorted(sum(dm.documents.values(), [])) == sorted(docs[:100]) and dm.documents["val"]


def test_unigram_perplexity_hand_computed(small_bpe):
    """Toy streams: train [5, 7, 7, 9, 7] with T = 2 gives train targets [7, 7, 9, 7] (C = 4, c7 = 3, c9 = 1);
    val [7, 9, 5] gives targets [9, 5]. Add-one: p(9) = 2 / (4 + V), p(5) = 1 / (4 + V), so the perplexity is
    exp(-(log 2 + log 1 - 2 log(4 + V)) / 2) = (4 + V) / sqrt(2)."""

    class Toy(TextDataModule):
        def token_stream(self, split):
            return {"train": torch.tensor([5, 7, 7, 9, 7]), "val": torch.tensor([7, 9, 5])}[split]

    dm = Toy("embedded", tokenizer=small_bpe, block_size=2)
    v = small_bpe.vocab_size
    assert dm.unigram_perplexity("val") == pytest.approx((4 + v) / math.sqrt(2), rel=1e-12)


def test_unigram_perplexity_naive_loop(embedded_dm):
    counts = Counter()
    for batch in embedded_dm.train_dataloader():
        counts.update(batch["targets"][batch["targets"] != IGNORE_INDEX].tolist())
    total, v = sum(counts.values()), embedded_dm.vocab_size
    nll, n = 0.0, 0
    for batch in embedded_dm.val_dataloader():
        for y in batch["targets"][batch["targets"] != IGNORE_INDEX].tolist():
            nll -= math.log((counts[y] + 1) / (total + v))
            n += 1
    assert embedded_dm.unigram_perplexity("val") == pytest.approx(math.exp(nll / n), rel=1e-9)
    assert 1 < embedded_dm.unigram_perplexity("validation") < v


def test_pack_and_dataset_edge_cases():
    assert text_module.pack_documents([[1, 2], [], [3]], eos_id=0).tolist() == [1, 2, 0, 0, 3]
    ds = PackedBlockDataset(torch.arange(10), block_size=4, pad_id=99, drop_last=False)
    assert (
        len(ds) == 3
        and ds[2]["input_ids"].tolist() == [8, 99, 99, 99]
        and ds[2]["targets"].tolist() == [9, -100, -100, -100]
    )
    with pytest.raises(IndexError):
        ds[3]


def test_errors(tmp_path, small_bpe):
    cache = str(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = TextDataModule(str(tmp_path / "missing.txt"), cache_dir=cache).documents
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        _ = TextDataModule(str(empty), cache_dir=cache).documents
    bad = tmp_path / "data.csv"
    bad.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        _ = TextDataModule(str(bad), cache_dir=cache).documents
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one short paragraph\n\nanother one\n\nand a third\n\nand a fourth one\n", encoding="utf-8")
    dm = TextDataModule(str(tiny), tokenizer=small_bpe, block_size=4096, cache_dir=cache)
    with pytest.raises(ValueError, match="block_size.*too large"):
        dm.setup("fit")
    for kwargs, match in [
        ({"block_size": 0}, "block_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"max_train_blocks": 0}, "max_train_blocks"),
        ({"val_fraction": 1.5}, "val_fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            TextDataModule("embedded", cache_dir=cache, **kwargs)
    with pytest.raises(ValueError, match="split"):
        TextDataModule("embedded", tokenizer=small_bpe, cache_dir=cache).unigram_perplexity("dev")
    ddir = tmp_path / "two"
    ddir.mkdir()
    for name in ("a", "b"):
        (ddir / f"{name}.jsonl").write_text(json.dumps({"text": "x y z"}), encoding="utf-8")
    with pytest.raises(ValueError, match="train_split"):
        _ = TextDataModule(str(ddir), train_split="nope", cache_dir=cache).documents


def test_split_fallback_for_few_documents():
    from lightning_llm.data.text import _split_with_fallback

    docs = [f"document number {i}" for i in range(6)]
    out = _split_with_fallback(docs, 0.05, 0.05)  # 5% of 6 documents: the hash split alone leaves val/test empty
    assert all(out.values()) and sorted(sum(out.values(), [])) == sorted(docs)
    single = "\n".join(f"line {i} of a single document" for i in range(100))
    out = _split_with_fallback([single], 0.1, 0.1)
    assert all(out.values()) and "\n".join(out["train"] + out["val"] + out["test"]) == single
    assert out["val"][0].startswith("line 8")  # train keeps the first ~80% of the characters


def test_hub_dataset_name_goes_through_load_dataset(monkeypatch, small_bpe, tmp_path):
    """A hub name is passed to `datasets.load_dataset(name, config)` (faked here: no network); a missing test
    split is derived from train by hash, and a load failure becomes a clear error."""
    import datasets

    docs = embedded_documents()[:200]
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if path == "org/broken":
            raise ConnectionError("offline")
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"content": docs[:180]}),
                "validation": datasets.Dataset.from_dict({"content": docs[180:]}),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = TextDataModule("org/corpus", "en", text_column="content", tokenizer=small_bpe, cache_dir=str(tmp_path))
    got = dm.documents
    assert calls == [("org/corpus", "en")]
    assert got["val"] == docs[180:] and got["test"] and sorted(got["train"] + got["test"]) == sorted(docs[:180])
    with pytest.raises(ValueError, match="org/broken.*could not be loaded"):
        _ = TextDataModule("org/broken", tokenizer=small_bpe, cache_dir=str(tmp_path)).documents


@pytest.mark.parametrize(
    "name, content",
    [
        ("good.txt", "first paragraph\nstill first\n\nsecond paragraph\n"),
        ("good.jsonl", '{"text": "a"}\n\n{"text": "b", "extra": 1}\n'),
        ("good.json", '[{"text": "a"}, {"text": "b"}]'),
        ("lines.json", '{"text": "a"}\n{"text": "b"}\n'),  # JSON Lines under a .json name, as datasets accepts
    ],
)
def test_well_formed_local_files_pass_the_diagnosis_and_load(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert text_module.diagnose_local_file(path) is None
    kwargs = {"sample_by": "paragraph"} if name.endswith(".txt") else {}  # as load_documents reads .txt files
    loaded = text_module.load_local_file(path, cache_dir=str(tmp_path / "hf"), **kwargs)
    texts = [t.strip() for t in loaded["train"]["text"] if t.strip()]
    assert texts == (["first paragraph\nstill first", "second paragraph"] if name.endswith(".txt") else ["a", "b"])


def test_local_file_error_names_file_line_and_fix(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        TextDataModule(dataset=str(path), vocab_size=300, cache_dir=str(tmp_path / "c")).prepare_data()
    message = str(err.value)
    assert "corpus.jsonl" in message and "line 3 is not valid JSON" in message and "Fix or remove" in message
    assert "\n" not in message and err.value.__cause__ is None  # one line, no DatasetGenerationError chained
