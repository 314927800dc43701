"""Fixtures for the data tests: a private cache directory and a small byte-level BPE."""

from __future__ import annotations

import pytest

from lightning_llm.data.corpus import embedded_split_documents
from lightning_llm.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """A cache root shared by the session (tests that count cache hits use their own tmp_path)."""
    return str(tmp_path_factory.mktemp("lightning_llm_cache"))


@pytest.fixture(scope="session")
def train_docs() -> list[str]:
    return embedded_split_documents()["train"]


@pytest.fixture(scope="session")
def small_bpe(train_docs) -> Tokenizer:
    """A 512-token byte-level BPE trained on the embedded train split (well under a second)."""
    return Tokenizer.train_bpe(train_docs, vocab_size=512)
