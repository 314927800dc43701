"""Shared plumbing of the callbacks: turning a foreign module + batch into logits, and logging text and images.

Any LightningModule is served by two hooks a user may pass:

* ``batch_fn(module, batch) -> (logits (B, T, V), targets (B, T))`` for callbacks that read the user's batches. The
  default understands dict batches (``input_ids`` + ``targets``, or Hugging Face ``labels``, shifted here) and
  ``(inputs, targets)`` tuples (``lightning.pytorch.demos`` style), calling ``module(inputs)`` or, if that needs
  the targets, ``module(inputs, targets)``; flattened ``(B*T, V)`` outputs and ``.logits`` attributes are handled.
* ``forward_fn(module, input_ids) -> logits (B, T, V)`` for callbacks that build their own inputs (LAMBADA,
  generation): default ``module(input_ids)``.

Notation: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
BatchFn = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]
ForwardFn = Callable[[Any, torch.Tensor], torch.Tensor]


def _as_logits(out: Any, shape: torch.Size) -> torch.Tensor:
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"The module returned {type(out).__name__}, not logits. Pass `forward_fn=lambda module, ids: logits` "
            "(or `batch_fn=lambda module, batch: (logits, targets)`) to the callback."
        )
    if out.dim() == 2 and out.shape[0] == shape.numel():  # flattened (B*T, V)
        out = out.view(*shape, -1)  # (B, T, V)
    if out.dim() != 3 or out.shape[:2] != shape:
        raise ValueError(
            f"Expected logits of shape (B, T, V) with (B, T) = {tuple(shape)}, got {tuple(out.shape)}. Pass a "
            "`batch_fn(module, batch) -> (logits, targets)` that returns next-token logits."
        )
    return out


def default_forward_fn(module: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``module(input_ids)`` as ``(B, T, V)`` logits."""
    return _as_logits(module(input_ids), input_ids.shape)


def default_batch_fn(module: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` of a batch; see the module docstring for the layouts understood."""
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
        if ids is None:
            raise ValueError(f"A dict batch needs 'input_ids', got keys {sorted(batch)}; pass `batch_fn=`.")
        if "targets" in batch:
            targets = batch["targets"]
        elif "labels" in batch:  # Hugging Face convention: labels are the inputs, the model shifts them
            labels = batch["labels"]
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        else:
            raise ValueError("A dict batch needs 'targets' (aligned next tokens) or 'labels'; pass `batch_fn=`.")
        mask = batch.get("attention_mask")
        try:
            out = module(ids, attention_mask=mask) if mask is not None else module(ids)
        except TypeError:
            out = module(ids)
        return _as_logits(out, ids.shape), targets
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        try:
            out = module(inputs)
        except TypeError:  # e.g. lightning.pytorch.demos.LightningTransformer.forward(inputs, target)
            out = module(inputs, targets)
        return _as_logits(out, inputs.shape), targets
    raise TypeError(
        f"Cannot read a batch of type {type(batch).__name__}; pass `batch_fn=lambda module, batch: (logits, targets)`."
    )


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def iter_batches(batches: Iterable[Any], device: torch.device, max_batches: int | None = None) -> Iterator[Any]:
    """The batches of ``batches`` moved to ``device``; at most ``max_batches`` of them."""
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield move_to(batch, device)


def flat_scored(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits (B*T, V) float32, targets (B*T,), valid (B*T,) bool)``: flattened, ``valid`` marks scored tokens."""
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    tgt = targets.reshape(-1)  # (B*T,)
    return flat, tgt, tgt != ignore_index


@contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """Run the block with ``module`` in eval mode; its training flag is restored afterwards (also on error)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def check_every(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be None or an int >= 1 (steps), got {value!r}.")


def is_due(step: int, every_n_steps: int | None) -> bool:
    """Whether a periodic callback runs at global step ``step``: every ``every_n_steps`` steps, never at step 0
    (``None``: never)."""
    return bool(every_n_steps) and step > 0 and step % every_n_steps == 0


def log_step_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Log ``metrics`` to every logger at the current global step and put them in ``trainer.callback_metrics`` (for
    checkpointing / early stopping), from hooks where ``LightningModule.log`` is not allowed."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


def log_dir(trainer: Any) -> Path:
    """The logger's directory (or the trainer's root dir)."""
    path = getattr(trainer, "log_dir", None) or trainer.default_root_dir
    return Path(path)


def log_text(trainer: Any, key: str, text: str, step: int) -> str:
    """Log ``text`` to every logger that supports text (W&B, TensorBoard, MLflow); always append it to
    ``<log_dir>/<key>.txt``. Returns where it went."""
    where = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        try:
            if hasattr(logger, "log_text"):  # WandbLogger
                logger.log_text(key=key, columns=["step", "text"], data=[[step, text]])
                where.append(type(logger).__name__)
            elif hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text(key, text, global_step=step)
                where.append(type(logger).__name__)
            elif hasattr(experiment, "log_text") and hasattr(logger, "run_id"):  # MLflow
                experiment.log_text(logger.run_id, text, f"{key.replace('/', '_')}_{step}.txt")
                where.append(type(logger).__name__)
        except Exception:  # noqa: BLE001 - a logger without text support must not stop training
            continue
    if trainer.is_global_zero:
        path = log_dir(trainer) / f"{key.replace('/', '_')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"--- step {step}\n{text}\n")
        where.append(str(path))
    return ", ".join(where)


def log_figure(trainer: Any, key: str, figure: Any, step: int) -> str | None:
    """Log a matplotlib figure as an image where the logger supports images (W&B ``log_image``, TensorBoard
    ``add_figure``); otherwise save ``<log_dir>/<key>/step_<step>.png``. Returns the PNG path or the logger name."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        try:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[figure], step=step)
                return type(logger).__name__
            if hasattr(experiment, "add_figure"):
                experiment.add_figure(key, figure, global_step=step)
                return type(logger).__name__
        except Exception:  # noqa: BLE001
            continue
    if not trainer.is_global_zero:
        return None
    path = log_dir(trainer) / key.replace("/", "_") / f"step_{step:07d}.png"
    os.makedirs(path.parent, exist_ok=True)
    figure.savefig(path, dpi=100)
    return str(path)
