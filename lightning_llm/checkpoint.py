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
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from lightning_llm._io import atomic_torch_save, atomic_write_text

__all__ = ["AtomicCheckpointIO", "ResumableDataLoader", "atomic_torch_save", "atomic_write_text"]


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


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can checkpoint mid-epoch and resume exactly where it stopped.

    Lightning saves ``state_dict()`` of every training loader that has one (``fit_loop`` → ``combined_loader``) and
    calls ``load_state_dict()`` before the first batch after a resume. The state is the number of batches this epoch's
    iterator has yielded and the shuffle generator's state at the start of the epoch. On resume the iterator restores
    the generator (so ``RandomSampler`` draws the same permutation), then skips the consumed batches at the *index*
    level (no sample is loaded twice). With Lightning's ``DistributedSampler`` (seeded by the global seed, with
    ``set_epoch``) only the skip is needed. Lightning does not prefetch from loaders that have a length, so "yielded" is
    exactly "trained on" when the checkpoint is written.

    Takes exactly ``DataLoader``'s arguments (Lightning re-creates it with a ``DistributedSampler`` under DDP/FSDP).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._epoch_generator_state: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None
        self._skip = 0

    @property
    def _index_sampler(self):  # the (batch) sampler the iterator draws indices from; skips resumed batches
        base = self.batch_sampler if self._auto_collation else self.sampler
        return _SkipFirst(base, self._skip) if self._skip else base

    def __iter__(self):
        generator = self.generator
        if self._pending is not None:
            state, self._pending = self._pending, None
            if generator is not None and state.get("generator_state") is not None:
                generator.set_state(state["generator_state"])
            self._skip = int(state["batches_yielded"])
        else:
            self._skip = 0
        self._epoch_generator_state = generator.get_state() if generator is not None else None
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
        if int(state_dict["batches_yielded"]) >= len(self):  # saved on the epoch's last batch: next epoch is fresh
            self._pending = None
            if self.generator is not None and state_dict.get("generator_state") is not None:
                self.generator.set_state(state_dict["generator_state"])
                _SkipFirst.exhaust(self)
            return
        self._pending = dict(state_dict)


class _SkipFirst:
    """Iterate ``base`` without its first ``skip`` items (indices only: nothing is loaded for the skipped ones)."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    @staticmethod
    def exhaust(loader: DataLoader) -> None:
        """Advance the loader's generator exactly as one full epoch of iteration does (seed draw + permutation)."""
        sampler = iter(loader.batch_sampler if loader._auto_collation else loader.sampler)
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # _BaseDataLoaderIter's base seed
        for _ in sampler:
            pass
