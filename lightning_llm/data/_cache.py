"""On-disk cache helpers shared by the data modules: where the cache lives, content hashes, atomic writes.

Every cached artefact is written with :func:`atomic_torch_save` / :func:`atomic_write_text` (from
:mod:`lightning_llm._io`, re-exported here): a temporary file in the destination directory moved into place
with ``os.replace``, so a crash or a concurrent writer (two DDP ranks) never leaves a truncated file
under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_llm._io import atomic_torch_save, atomic_write_text

__all__ = [
    "atomic_torch_save",
    "atomic_write_text",
    "default_cache_dir",
    "hash_json",
    "hash_texts",
    "resolve_cache_dir",
]

CACHE_ENV_VAR = "LIGHTNING_LLM_CACHE"


def default_cache_dir() -> Path:
    """The cache root: ``$LIGHTNING_LLM_CACHE`` if set, else ``~/.cache/lightning_llm``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_llm"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` as a ``Path``, or :func:`default_cache_dir` when it is ``None``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def hash_texts(texts: Iterable[str], *extra: Any) -> str:
    """sha256 hex digest of a sequence of strings (each length-prefixed, so ``["ab"]`` and ``["a", "b"]``
    differ) followed by the JSON of ``extra``."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()
