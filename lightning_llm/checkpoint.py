"""Checkpoint writing that never leaves a truncated file where a good one was.

Lightning's ``TorchCheckpointIO`` serialises into memory and then writes straight to the destination, so a process
killed during the write leaves a truncated file under the final name. :class:`AtomicCheckpointIO` writes to a
temporary file in the same directory, flushes and fsyncs it, and ``os.replace``-s it over the destination (atomic on
POSIX): the destination always holds either the previous complete checkpoint or the new complete one.

:class:`ResumableDataLoader` is a drop-in ``DataLoader`` whose position Lightning stores in the checkpoint, so a run
resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
import os
import pickle
import pickletools
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from lightning_llm._io import atomic_torch_save, atomic_write_text
from lightning_llm.config import TransformerConfig

__all__ = [
    "SAFE_GLOBALS",
    "AtomicCheckpointIO",
    "ResumableDataLoader",
    "atomic_torch_save",
    "atomic_write_text",
    "load_checkpoint",
]


#: The only non-builtin type our checkpoints may hold: scripts that pass ``CausalLM(config=TransformerConfig(...))`` store
#: the dataclass in ``hyper_parameters`` (the CLI stores plain dicts, and ``transformer_config`` is always a dict).
#: Unpickling it only creates the dataclass and sets its fields (no ``__post_init__``, no import, no call). Registered
#: process-wide so that Lightning's own resume path (``Trainer.fit(ckpt_path=...)``, which on torch >= 2.6 loads with
#: ``weights_only=True``) accepts these checkpoints too.
SAFE_GLOBALS: list[Any] = [TransformerConfig]
torch.serialization.add_safe_globals(SAFE_GLOBALS)

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint file without running code: ``torch.load(weights_only=True)``.

    Our checkpoints hold only tensors, numbers, strings, containers and :class:`~lightning_llm.config.TransformerConfig`
    (:data:`SAFE_GLOBALS`). A file that needs anything else to unpickle (a ``.ckpt`` that would import or call code) is
    refused with a ``ValueError`` naming the offending global, and nothing it carries is executed. An empty, truncated
    or corrupted file, or a file that is not a PyTorch checkpoint (text, JSON, safetensors), gets a ``ValueError``
    saying which; a missing path a ``FileNotFoundError``.

    Args:
        path: a ``.ckpt`` / ``.pt`` file written by ``torch.save`` (a Lightning Trainer or :func:`atomic_torch_save`).
        map_location: where to put the tensors (``torch.load``'s argument).

    Returns:
        The checkpoint dict.
    """
    where = os.fspath(path)
    file = Path(where)
    if not file.exists():
        raise FileNotFoundError(f"checkpoint {where!r} does not exist; pass the path of a .ckpt file.")
    if file.is_dir():
        raise ValueError(
            f"checkpoint {where!r} is a directory, expected one .ckpt file. A sharded checkpoint folder (FSDP2 / tensor "
            "parallel) is read by lightning_llm.load_pretrained or lightning_llm.loading.read_checkpoint."
        )
    size = file.stat().st_size
    if size == 0:
        raise ValueError(
            f"checkpoint {where!r} is empty (0 bytes): its write was interrupted or the file was truncated. Use an "
            "earlier checkpoint (e.g. the previous step's file)."
        )
    kind = _sniff(file)
    if kind is not None:
        raise ValueError(f"{where!r} is not a PyTorch checkpoint: it looks like {kind}.")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        found = _GLOBAL_RE.search(message)
        unsafe = found.group(1) if found is not None else _pickle_global(file) if kind is None else None
        if unsafe is not None:
            raise ValueError(
                f"Refusing to load checkpoint {where!r}: unpickling it would import or call {unsafe!r}, which "
                "could run code. Only checkpoints holding tensors, numbers, strings and containers are read; if you "
                "wrote this file yourself and trust it, re-save its tensors with torch.load(weights_only=False) first."
            ) from None
        raise ValueError(
            f"checkpoint {where!r} is corrupted or not a PyTorch checkpoint (unpickling failed: {_reason(message)}). "
            "Use another checkpoint, or re-save it with torch.save."
        ) from None
    except (RuntimeError, EOFError, KeyError, IndexError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"checkpoint {where!r} ({size} bytes) is truncated or corrupted: torch.load failed with "
            f"{type(err).__name__}: {_reason(str(err))}. Use an earlier checkpoint (e.g. the previous step's "
            "file); files written through AtomicCheckpointIO are never left half-written under their final name."
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint {where!r} holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a .ckpt "
            "file written by a Lightning Trainer."
        )
    return checkpoint


def _sniff(file: Path) -> str | None:
    """A description of what ``file`` is when it is clearly not a ``torch.save`` file, else ``None``."""
    with open(file, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):  # the zip format torch.save writes since 1.6
        return None
    if head[:1] == b"\x80":  # a pickle (torch's legacy format): let the weights-only unpickler judge it
        return None
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < file.stat().st_size:
        return "a safetensors file; read it with safetensors.torch.load_file, or pass its folder to load_pretrained"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON text; pass the .ckpt file written by the Trainer"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive; decompress it first"
    try:
        head.decode("ascii")
    except UnicodeDecodeError:
        return (
            "binary data of an unknown format (not torch.save's zip or pickle); the file is corrupted or another kind"
        )
    return "a text file; pass the .ckpt file written by the Trainer"


def _reason(message: str) -> str:
    """The informative sentence of a ``torch.load`` error (its messages wrap the cause in paragraphs of advice)."""
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = found.group(1).strip() if found is not None else lines[0] if lines else "no message"
    return text.split(". ")[0].rstrip(".")[:200]


def _pickle_global(file: Path) -> str | None:
    """The first global a raw pickle file would import (read with ``pickletools``, which executes nothing)."""
    strings: list[str] = []
    try:
        with open(file, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - a malformed pickle has no global to report
        return None
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """A drop-in ``CheckpointIO`` plugin: ``Trainer(plugins=[AtomicCheckpointIO()])``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint got storage_options={storage_options!r}; it writes local files only. "
                "Remove the storage options or use Lightning's TorchCheckpointIO for remote storage."
            )
        fs = get_filesystem(path)
        if getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's resume path (``Trainer.fit(ckpt_path=...)``) reads local files with :func:`load_checkpoint`
        (``weights_only=True``, clear errors); ``weights_only=False`` given explicitly (``--weights_only false``) is
        the user's opt-in to full unpickling of a trusted file and goes to ``TorchCheckpointIO``."""
        fs = get_filesystem(path)
        if weights_only is False or getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can checkpoint at any step and resume exactly where it stopped.

    Lightning saves ``state_dict()`` of every training loader that has one (``fit_loop`` → ``combined_loader``) and
    calls ``load_state_dict()`` before the first batch after a resume. The state is the number of batches this epoch's
    iterator has yielded and the shuffle generator's state at the start of the epoch.

    Epochs are made independent of how far the previous iterator was drained: epoch ``e + 1`` starts from a generator
    state derived from epoch ``e``'s starting state only (:func:`_next_epoch_state`), not from whatever the previous
    iterator happened to draw. (``RandomSampler`` draws a second permutation when it is asked for an index past the
    last one; a plain ``for`` loop asks, Lightning does not, since it stops at ``len(loader)``. Deriving the next
    epoch from the generator's running state therefore made a resumed run, which cannot know which of the two
    happened, replay another permutation whenever the dataset length was a multiple of the batch size.)

    On resume mid-epoch the iterator restores the epoch's starting state (so ``RandomSampler`` draws the same
    permutation), then skips the consumed batches at the *index* level (no sample is loaded twice). A checkpoint
    written on an epoch's last batch resumes at the start of the next epoch. With Lightning's ``DistributedSampler``
    (seeded by the global seed, with ``set_epoch``) only the skip matters. Lightning does not prefetch from loaders
    that have a length, so "yielded" is exactly "trained on" when the checkpoint is written.

    The loader must be iterated once per epoch (as Lightning does); ``limit_train_batches`` below ``len(loader)`` is
    not supported for exact resume at an epoch's end, since the loader cannot tell that such an epoch ended early.

    Takes exactly ``DataLoader``'s arguments (Lightning re-creates it with a ``DistributedSampler`` under DDP/FSDP).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._epoch_generator_state: torch.Tensor | None = None  # generator state when the current epoch started
        self._pending: dict[str, Any] | None = None
        self._skip = 0

    @property
    def _index_sampler(self):  # the (batch) sampler the iterator draws indices from; skips resumed batches
        base = self.batch_sampler if self._auto_collation else self.sampler
        return _SkipFirst(base, self._skip) if self._skip else base

    def __iter__(self):
        generator = self.generator
        start_state = self._epoch_generator_state  # previous epoch's start (None before the first epoch)
        self._skip = 0
        if self._pending is not None:
            state, self._pending = self._pending, None
            start_state = state.get("generator_state")
            if int(state["batches_yielded"]) < len(self):  # mid-epoch: replay this epoch from its start, skipping
                self._skip = int(state["batches_yielded"])
            elif start_state is not None:  # saved on the epoch's last batch: the next epoch starts fresh
                start_state = _next_epoch_state(start_state)
        elif start_state is not None:
            start_state = _next_epoch_state(start_state)
        if generator is not None:
            if start_state is not None:
                generator.set_state(start_state)
            self._epoch_generator_state = generator.get_state()
        self._yielded = self._skip
        iterator = super().__iter__()
        self._skip = 0  # the iterator holds its own (skipping) index iterator now
        for batch in iterator:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_yielded": self._yielded, "generator_state": self._epoch_generator_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "batches_yielded" not in state_dict:
            raise ValueError(
                f"ResumableDataLoader.load_state_dict expects the dict written by state_dict() with 'batches_yielded', "
                f"got keys {sorted(state_dict)}; the checkpoint came from a different data loader."
            )
        state = dict(state_dict)
        if self.generator is None:
            state["generator_state"] = None
        self._pending = state


def _next_epoch_state(state: torch.Tensor) -> torch.Tensor:
    """The generator state epoch ``e + 1`` starts from, a function of epoch ``e``'s starting state alone: a generator
    restored to ``state`` draws one 63-bit seed, and a fresh generator seeded with it gives the new state."""
    previous = torch.Generator()
    previous.set_state(state)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=previous))
    return torch.Generator().manual_seed(seed).get_state()


class _SkipFirst:
    """Iterate ``base`` without its first ``skip`` items (indices only: nothing is loaded for the skipped ones)."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)
