"""Atomic file writes, shared by the checkpoint plugin, the CLI and the data caches (plain torch, no Lightning).

Every file is written to a temporary file in the destination directory and moved into place with ``os.replace``
(atomic on POSIX), so a crash or a concurrent writer (two DDP ranks) never leaves a truncated file under the final
name: the destination holds either the previous complete file or the new complete one.

Permissions: the temporary file is created like ``open(path, "w")`` creates a file, with mode ``0o666`` filtered by
the process umask (and the directory's default ACL), so the final file gets the mode a plain write would give it; when
the destination already exists, its permission bits are kept (as ``open(path, "w")`` keeps them).

Temporary files: ``tmp`` is ``.<name>.<host>.<pid>.<random>.tmp`` beside the destination ``path``, where ``host`` is a
short hash of this machine's host name and ``pid`` the writer's process id. A write that fails removes its ``tmp``; a
writer that is killed (SIGKILL, power loss) cannot, so every write first removes the stale temporary files *of the same
destination*: those whose writer was on this host and no longer runs (``pid`` dead). The temporary files of live
writers (another rank writing the same file right now) and of other hosts (a shared file system) are never touched,
nor are other files. Temporary files named by older versions (``.<name>.<random>.tmp``, no pid) are removed once they
are older than :data:`LEGACY_TMP_MAX_AGE_S`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["LEGACY_TMP_MAX_AGE_S", "atomic_torch_save", "atomic_write_text", "stale_temporary_files"]

#: age (seconds) after which a temporary file without a writer pid in its name is considered abandoned
LEGACY_TMP_MAX_AGE_S = 3600.0

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (``kill(pid, 0)`` sends no signal)."""
    if pid <= 0:
        return True  # never claim that a malformed pid is dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def stale_temporary_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files beside ``path`` that an interrupted atomic write of ``path`` left behind (see the module
    docstring for the rule); :func:`atomic_torch_save` and :func:`atomic_write_text` remove them before writing."""
    path = Path(path)
    prefix = f".{path.name}."
    out = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return []
    for candidate in candidates:
        fields = candidate.name[len(prefix) : -len(".tmp")].split(".")
        if len(fields) == 3:  # host, pid, random: ours
            host, pid, _ = fields
            if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
                out.append(candidate)
        elif len(fields) == 1:  # mkstemp's `.<name>.<random>.tmp` of older versions: no pid, judged by age
            try:
                age = time.time() - candidate.stat().st_mtime
            except OSError:
                continue
            if age > LEGACY_TMP_MAX_AGE_S:
                out.append(candidate)
    return out


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create ``tmp`` exclusively with mode ``0o666`` (the kernel applies the umask, as for ``open(path, "w")``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _atomic_write(
    path: str | os.PathLike, mode: str, write: Callable[[IO[Any]], object], fsync: bool, encoding: str | None = None
) -> None:
    """Open ``tmp`` with ``mode``, call ``write(file)``, optionally fsync, then ``os.replace(tmp, path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporary_files(path):
        stale.unlink(missing_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            try:  # an existing destination keeps its permission bits, as with open(path, "w")
                os.chmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            except (FileNotFoundError, NotImplementedError):
                pass
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the write failed


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX: the directory entry lives in the directory's data)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file (flushed and fsynced) and ``os.replace``."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f), fsync=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write(path, "w", lambda f: f.write(text), fsync=False, encoding="utf-8")
