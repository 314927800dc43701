"""Helpers for the fault-injection suite, importable both by the tests and by ``python -m lightning_llm`` subprocesses.

The subprocesses get this folder on ``PYTHONPATH`` and load :class:`StepRecorder` through
``--trainer.callbacks+=_faults_helpers.StepRecorder``; the in-process tests put the folder on ``sys.path`` (pytest runs
with ``--import-mode=importlib``, so test folders are not importable by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_llm.checkpoint import ResumableDataLoader


def batch_fingerprint(batch: Any) -> list:
    """What a batch holds, independently of the loader: its sample indices when the batch carries them (the toy
    data below), else one sha1 per row of ``input_ids`` (the text data modules)."""
    if isinstance(batch, (list, tuple)):  # TensorDataset(index, x, y)
        return batch[0].tolist()
    if "prompt" in batch:  # PromptDataModule: a list of strings
        return [hashlib.sha1(str(p).encode("utf-8")).hexdigest()[:16] for p in batch["prompt"]]
    ids = batch.get("input_ids", batch.get("chosen_input_ids"))
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in ids]


class StepRecorder(Callback):
    """Records, for every optimizer step, the global step, the exact training loss and what the batch held.

    Args:
        path: a JSON-lines file that gets one line per step, flushed at once (it survives a SIGKILL of the process);
            ``None`` keeps the records in memory only (``records``).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:  # under DDP, rank 0 speaks for the run (its loss, its batch)
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # None under manual optimization (PPO)
        with torch.no_grad():
            weights = sum(float(p.detach().double().square().sum()) for p in pl_module.parameters() if p.requires_grad)
        record = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batch_idx": int(batch_idx),
            "loss": None if loss is None else float(loss.detach()).hex(),  # exact: the float's hex, compared bitwise
            "weights": weights.hex(),  # sum of squares of the trainable weights after the step
            "batch": batch_fingerprint(batch),
            "time": time.time(),
        }
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete lines of a :class:`StepRecorder` file (a line cut by a kill is dropped; no file: no line)."""
    out: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


# ----------------------------------------------------------------------------------------------- toy Trainer problem
class ToyRegression(L.LightningModule):
    """A linear regression trained with SGD + momentum (the optimizer state matters on resume)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        _, x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ToyData(L.LightningDataModule):
    """``n`` samples ``(index, x, y)``, shuffled by a :class:`ResumableDataLoader` with a seeded generator."""

    def __init__(self, n: int, batch_size: int = 8, seed: int = 7) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
        self.train = TensorDataset(torch.arange(n), x, y)
        self.val = TensorDataset(torch.arange(16), x[:16], y[:16])
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


# ----------------------------------------------------------------------------------------------- self-inflicted kills
class Killer(Callback):
    """SIGKILLs its own process at one precise point of ``fit``, read from ``$FAULT_KILL``:

    * ``train_batch_end:<step>``: right after optimizer step ``<step>``, before its checkpoint is written (Lightning
      runs ``ModelCheckpoint`` after every other callback);
    * ``validation:<step>``: in the middle of the validation that follows step ``<step>``;
    * ``checkpoint_write:<step>:<n>``: inside the ``n``-th ``torch.save`` of step ``<step>`` (1: ``step=<step>.ckpt``,
      2: ``last.ckpt``), after half of the checkpoint's bytes reached the disk (flushed and fsynced).

    Nothing happens when ``$FAULT_KILL`` is unset, so the same command line serves the uninterrupted run.
    """

    def __init__(self) -> None:
        where, _, rest = os.environ.get("FAULT_KILL", "").partition(":")
        step, _, nth = rest.partition(":")
        self.where, self.step, self.nth = where, int(step) if step else -1, int(nth) if nth else 1
        self._saves = 0

    def _die(self) -> None:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.where != "checkpoint_write":
            return
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if trainer.global_step == self.step and not isinstance(f, (str, os.PathLike)):
                self._saves += 1
                if self._saves == self.nth:
                    import io

                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    self._die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "train_batch_end" and trainer.global_step == self.step:
            self._die()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.where == "validation" and trainer.global_step == self.step and trainer.state.fn == "fit":
            self._die()
