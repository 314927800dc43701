"""Atomic file writes, shared by the checkpoint plugin, the CLI and the data caches (plain torch, no Lightning).

Every file is written to a temporary file in the destination directory and moved into place with ``os.replace``
(atomic on POSIX), so a crash or a concurrent writer (two DDP ranks) never leaves a truncated file under the final
name: the destination holds either the previous complete file or the new complete one, and no temporary file is left
behind when the write fails.

Notation: ``tmp`` is the temporary file ``.<name>.<random>.tmp`` beside the destination ``path``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_text"]


def _atomic_write(
    path: str | os.PathLike, mode: str, write: Callable[[IO[Any]], object], fsync: bool, encoding: str | None = None
) -> None:
    """Open ``tmp`` with ``mode``, call ``write(file)``, optionally fsync, then ``os.replace(tmp, path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only still there when the write failed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file (flushed and fsynced) and ``os.replace``."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f), fsync=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write(path, "w", lambda f: f.write(text), fsync=False, encoding="utf-8")
