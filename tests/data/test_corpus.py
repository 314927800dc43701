"""The embedded corpus: size, provenance, cleaning, determinism, and the hash split."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import sys
from pydoc_data.topics import topics

import pytest

import lightning_llm.data.corpus as corpus_module
from lightning_llm.data.corpus import (
    embedded_corpus,
    embedded_documents,
    embedded_split_documents,
    embedded_splits,
    split_documents,
)


def test_corpus_is_large_real_text():
    corpus = embedded_corpus()
    assert len(corpus.encode("utf-8")) >= 400_000
    # Provenance: the reference topics and stdlib docstrings are in it (first line of `help("assert")`, and the
    # first line of textwrap.dedent's docstring).
    assert topics["assert"].splitlines()[0] in corpus
    import textwrap

    assert textwrap.dedent.__doc__.strip().splitlines()[0] in corpus
    # English prose, not code: most characters are letters or spaces.
    letters = sum(ch.isalpha() or ch == " " for ch in corpus)
    assert letters / len(corpus) > 0.8


def test_documents_are_cleaned():
    docs = embedded_documents()
    assert len(docs) == len(set(docs)) > 500
    for doc in docs:
        assert len(doc) >= 80
        assert "\t" not in doc and "\r" not in doc and "\n\n\n" not in doc
        assert doc == doc.strip("\n") and doc == doc.rstrip()
        assert all(line == line.rstrip() for line in doc.split("\n"))
    assert embedded_corpus() == "\n\n".join(docs)


def test_corpus_is_deterministic_across_processes():
    """A fresh interpreter with another string-hash seed builds the same bytes."""
    code = (
        "import hashlib\n"
        "from lightning_llm.data.corpus import embedded_corpus\n"
        "print(hashlib.sha256(embedded_corpus().encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == hashlib.sha256(embedded_corpus().encode()).hexdigest()


def test_corpus_ignores_monkeypatched_stdlib(monkeypatch):
    """Libraries that add methods to stdlib classes (transformers adds ``warning_once`` to logging.Logger) must not
    change the corpus: only functions defined in the module itself count."""
    before = corpus_module._documents()

    def shout_once(self, msg):
        """This method is identical to logger.warning but shouts, and was added by some third-party library."""

    shout_once.__module__ = "thirdparty.logging"
    monkeypatch.setattr(logging.Logger, "shout_once", shout_once, raising=False)
    corpus_module._documents.cache_clear()
    try:
        assert corpus_module._documents() == before
    finally:
        corpus_module._documents.cache_clear()


def test_splits_disjoint_cover_and_sized():
    docs = embedded_documents()
    splits = embedded_split_documents()
    sets = {k: set(v) for k, v in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sum(len(v) for v in splits.values()) == len(docs)
    assert sets["train"] | sets["val"] | sets["test"] == set(docs)
    # 5% each in expectation; with ~1000 documents the binomial standard deviation is ~0.7%.
    for split in ("val", "test"):
        assert 0.02 < len(splits[split]) / len(docs) < 0.09
    joined = embedded_splits()
    assert joined == {k: "\n\n".join(v) for k, v in splits.items()}
    assert sum(len(v.encode()) for v in joined.values()) > 400_000


def test_split_is_by_document_hash_not_position():
    docs = embedded_documents()[:300]
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    a, b = split_documents(docs, 0.1, 0.1), split_documents(shuffled, 0.1, 0.1)
    for split in a:
        assert set(a[split]) == set(b[split])
    # Independent reference: the first 8 bytes of sha256 as a fraction of 2**64.
    for doc in docs[:50]:
        h = int(hashlib.sha256(doc.encode()).hexdigest()[:16], 16) / 2**64
        expected = "val" if h < 0.1 else "test" if h < 0.2 else "train"
        assert doc in a[expected]


@pytest.mark.parametrize("val, test", [(-0.1, 0.05), (0.05, 1.0), (0.6, 0.5), ("0.1", 0.1)])
def test_bad_fractions(val, test):
    with pytest.raises(ValueError, match="fraction"):
        split_documents(["a"], val, test)
