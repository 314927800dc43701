"""On-disk cache helpers shared by the data modules: where the cache lives, content hashes, atomic writes.

Every cached artefact is written to a temporary file in the destination directory and moved into place
with ``os.replace``, so a crash or a concurrent writer (two DDP ranks) never leaves a truncated file
under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

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


def _temp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
