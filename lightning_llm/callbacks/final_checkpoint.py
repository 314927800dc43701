"""``FinalCheckpoint``: the weights a ``fit`` ends with are always on disk.

Lightning's default ``ModelCheckpoint`` saves when a validation ends (or at an epoch's end when there is no
validation inside the epoch). A run whose ``max_steps`` is not a multiple of ``val_check_interval`` (the quickstart
shortened with ``--trainer.max_steps 100`` while its preset validates every 250 steps) ends after its last
checkpoint: the trained weights of the last steps, or of the whole run, are lost, and ``evaluate`` / ``export`` have
nothing to read. This callback saves one more checkpoint when training ends past the last one, through the
trainer's own checkpoint callback: same folder, same file-name template (``epoch=0-step=100.ckpt`` by default),
written by ``trainer.save_checkpoint`` (atomically with :class:`~lightning_llm.checkpoint.AtomicCheckpointIO`).

It acts only for a ``ModelCheckpoint`` without ``monitor`` and without ``save_last`` (Lightning's default, keeping
the latest checkpoints): with ``save_last`` Lightning already saves ``last.ckpt`` at the end, and a monitored callback
keeps the best scores, which a final unvalidated step has none of. The earlier checkpoint stays beside it. The file
holds the weights, optimizer and loop state as any checkpoint; resuming from it with a larger ``max_steps`` goes on at
the next epoch (Lightning closes the epoch when ``max_steps`` ends it, as for its own ``last.ckpt`` written at the end
of training), not at the next batch of the interrupted epoch as a mid-epoch validation's checkpoint does. Nothing
is saved when training stopped at a step that was already saved, took no step, or was interrupted (Ctrl-C: the
fault-tolerant path of Lightning handles that). The ``lightning-llm`` CLI adds this callback to every run;
Trainer API users add it themselves: ``L.Trainer(callbacks=[FinalCheckpoint()])``.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["FinalCheckpoint"]


class FinalCheckpoint(L.Callback):
    """Save a checkpoint when ``fit`` ends at a step no checkpoint holds (see the module docstring)."""

    def __init__(self) -> None:
        self.saved_step: int | None = None  # global step of the newest checkpoint written in this run

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if (
            not isinstance(callback, ModelCheckpoint)
            or callback.monitor is not None
            or callback.save_last
            or callback.save_top_k == 0
            or callback.dirpath is None
            or trainer.interrupted
            or trainer.global_step == 0
            or self.saved_step == trainer.global_step
        ):
            return
        step = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
        trainer.save_checkpoint(callback.format_checkpoint_name(step))
