"""Atomic writes: permissions as a plain ``open()`` gives them, no partial file ever, stale temporaries cleaned.

The writers that get killed are real processes: a child starts an atomic write, blocks in the middle of it (its
temporary file holds partial bytes), and is SIGKILLed or released by the test.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_llm import _io
from lightning_llm._io import atomic_torch_save, atomic_write_text, stale_temporary_files

# a child that writes `path` atomically but blocks after writing partial bytes, until `release` exists
_BLOCKED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from lightning_llm._io import _atomic_write

    path, release, payload = sys.argv[1], Path(sys.argv[2]), sys.argv[3].encode()

    def write(f):
        f.write(payload[:3])
        f.flush()
        print("writing", flush=True)
        while not release.exists():
            time.sleep(0.01)
        f.write(payload[3:])

    _atomic_write(path, "wb", write, fsync=True)
    """
)


def _start_blocked_writer(path: Path, release: Path, payload: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_WRITER, str(path), str(release), payload], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"  # its temporary file now holds partial bytes
    return proc


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def umask():
    def set_umask(value: int) -> None:
        os.umask(value)

    old = os.umask(0o022)
    os.umask(old)
    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
@pytest.mark.parametrize("writer", ["torch", "text"])
def test_new_files_get_the_mode_of_a_plain_open(tmp_path, umask, mask, writer):
    umask(mask)
    with open(tmp_path / "plain", "w") as f:  # the reference: what open() gives under this umask
        f.write("x")
    target = tmp_path / "out.bin"
    if writer == "torch":
        atomic_torch_save({"w": torch.ones(2)}, target)
    else:
        atomic_write_text(target, "hello")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~mask


def test_existing_destination_keeps_its_permissions(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "metrics.json"
    target.write_text("old")
    target.chmod(0o640)
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    (tmp_path / "plain").chmod(0o640)
    with open(tmp_path / "plain", "w") as f:  # the reference: rewriting keeps the mode
        f.write("y")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert _temporaries(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and pid liveness are POSIX")
def test_killed_writer_leaves_the_old_file_and_its_temporary_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_write_text(target, "complete old content")
    release = tmp_path / "release"
    killed = _start_blocked_writer(target, release, "new content of the killed writer")
    alive = _start_blocked_writer(target, release, "new content of the live writer")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        temporaries = _temporaries(tmp_path)
        assert len(temporaries) == 2  # one per writer, both holding partial bytes
        assert target.read_text() == "complete old content"  # never a partial file under the final name
        dead = f".last.ckpt.{_io._HOST}.{killed.pid}."
        assert [p.name for p in stale_temporary_files(target)] == [t for t in temporaries if t.startswith(dead)]

        # files the cleaning must not touch: another destination's stale temporary, another host's, an unrelated one
        keep = [
            f".other.ckpt.{_io._HOST}.{killed.pid}.0badc0de.tmp",
            f".last.ckpt.ffffffff.{killed.pid}.0badc0de.tmp",
            "notes.last.ckpt.tmp",
        ]
        for name in keep:
            (tmp_path / name).write_text("x")
        legacy_old, legacy_new = tmp_path / ".last.ckpt.abcd1234.tmp", tmp_path / ".last.ckpt.efgh5678.tmp"
        legacy_old.write_text("x")
        legacy_new.write_text("x")
        old = time.time() - _io.LEGACY_TMP_MAX_AGE_S - 60
        os.utime(legacy_old, (old, old))

        atomic_write_text(target, "written after the kill")
        assert target.read_text() == "written after the kill"
        left = _temporaries(tmp_path)
        assert not any(t.startswith(dead) for t in left)  # the killed writer's temporary is gone
        assert legacy_old.name not in left and legacy_new.name in left
        assert [t for t in left if t.startswith(f".last.ckpt.{_io._HOST}.{alive.pid}.")]  # the live one is untouched
        for name in keep:
            assert (tmp_path / name).exists(), name
    finally:
        release.touch()
    assert alive.wait(timeout=30) == 0  # the live writer finishes its write normally
    assert target.read_text() == "new content of the live writer"
    assert not [t for t in _temporaries(tmp_path) if t.startswith(f".last.ckpt.{_io._HOST}.")]
