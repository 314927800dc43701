"""Helpers shared by the benchmark scripts (imported as ``_common``: each script's folder is on ``sys.path``)."""

from __future__ import annotations

import time

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (``"cuda"``, ``"cuda:1"`` or a ``torch.device``); no-op elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def token_rows_dataset(tokens: torch.Tensor) -> torch.utils.data.Dataset:
    """Rows of ``tokens (N, T + 1)`` as causal-LM batches ``{"input_ids": row[:-1], "targets": row[1:]}``."""

    class TokenRows(torch.utils.data.TensorDataset):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            row = self.tensors[0][i]
            return {"input_ids": row[:-1], "targets": row[1:]}

    return TokenRows(tokens)


def step_probe():
    """A Lightning callback recording each step's rank-averaged loss and end time, and (once) the rank's parameter +
    optimizer-state bytes (:func:`lightning_llm.parallel.sharded_state_bytes`) as ``bytes``."""
    from lightning.pytorch.callbacks import Callback

    from lightning_llm.parallel import sharded_state_bytes

    class StepProbe(Callback):
        def __init__(self) -> None:
            self.times, self.losses, self.bytes = [], [], None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")))
            self.times.append(time.perf_counter())
            if self.bytes is None:
                self.bytes = sharded_state_bytes(pl_module, trainer.optimizers[0])

    return StepProbe()
