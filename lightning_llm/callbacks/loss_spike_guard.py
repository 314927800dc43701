"""``LossSpikeGuard``: catch NaN/inf losses and loss spikes before they reach the weights.

The guard sees every training loss in ``on_before_backward`` (before gradients exist). A loss is

* **non-finite** if it is NaN or +-inf;
* a **spike** if, after ``warmup`` healthy steps, ``loss > threshold * median(last window losses)`` or
  ``loss > ema + n_sigma * ema_std`` (exponential moving mean and standard deviation with ``ema_decay``) -- both
  tests must fire when ``mode="both"`` (the default, robust to noisy small batches), either with ``"any"``.

On a bad loss it records the event (step, batch index, loss, reference) and acts:

* ``"skip"``: drop this update (gradients are set to ``None`` before the optimizer step, so no weight moves);
* ``"stop"``: drop the update and stop training cleanly (``trainer.should_stop``);
* ``"raise"``: raise ``FloatingPointError`` with the event and what to try;
* ``"warn"``: only warn.

``max_skips`` consecutive skips turn into a stop. Decisions are all-reduced across processes, so every rank skips
(or stops) the same step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

ADVICE = (
    "What to try: lower the learning rate or lengthen its warmup; enable or tighten gradient clipping "
    "(Trainer(gradient_clip_val=1.0)); train in bf16 or fp32 instead of fp16; inspect the batch at this index for "
    "corrupt or degenerate data (very long repeats, empty targets); check that targets are in [0, vocab_size)."
)


@dataclass
class SpikeEvent:
    """One bad loss: where it happened and against what reference."""

    step: int
    batch_idx: int
    epoch: int
    loss: float
    reference: float | None
    kind: str  # "nonfinite" | "spike"
    action: str

    def message(self) -> str:
        ref = "" if self.reference is None else f" (reference {self.reference:.4g})"
        return (
            f"LossSpikeGuard: {self.kind} loss {self.loss:.4g}{ref} at global step {self.step}, epoch {self.epoch}, "
            f"batch index {self.batch_idx}; action: {self.action}. {ADVICE}"
        )


class LossSpikeGuard(L.Callback):
    """Detect NaN/inf losses and spikes; skip the update, stop, raise or warn.

    Args:
        action: ``"skip" | "stop" | "raise" | "warn"`` for spikes.
        nonfinite_action: the same choice for NaN/inf (default ``"skip"``: never let NaN reach the weights).
        threshold: spike when ``loss > threshold * running median``.
        n_sigma: spike when ``loss > ema + n_sigma * ema_std``.
        mode: ``"both"`` (both tests) or ``"any"`` (either test).
        window: losses in the running median.
        ema_decay: decay of the moving mean and variance.
        warmup: healthy steps before spike detection starts (NaN/inf are caught from the start).
        max_skips: consecutive skipped steps that turn into a stop.

    Attributes:
        events: every :class:`SpikeEvent` so far.
    """

    def __init__(
        self,
        action: Literal["skip", "stop", "raise", "warn"] = "skip",
        nonfinite_action: Literal["skip", "stop", "raise", "warn"] = "skip",
        threshold: float = 3.0,
        n_sigma: float = 6.0,
        mode: Literal["both", "any"] = "both",
        window: int = 50,
        ema_decay: float = 0.98,
        warmup: int = 20,
        max_skips: int = 10,
    ) -> None:
        for name, value in (("action", action), ("nonfinite_action", nonfinite_action)):
            if value not in ("skip", "stop", "raise", "warn"):
                raise ValueError(f"`{name}` must be 'skip', 'stop', 'raise' or 'warn', got {value!r}.")
        if mode not in ("both", "any"):
            raise ValueError(f"`mode` must be 'both' or 'any', got {mode!r}.")
        if threshold <= 1.0:
            raise ValueError(f"`threshold` must be > 1 (a multiple of the running median), got {threshold}.")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {ema_decay}.")
        self.action, self.nonfinite_action = action, nonfinite_action
        self.threshold, self.n_sigma, self.mode = threshold, n_sigma, mode
        self.window = deque(maxlen=window)
        self.ema_decay, self.warmup, self.max_skips = ema_decay, warmup, max_skips
        self.ema: float | None = None
        self.ema_var = 0.0
        self.healthy = 0
        self.events: list[SpikeEvent] = []
        self._skip_this_step = False
        self._consecutive = 0
        self._batch_idx = -1

    # ------------------------------------------------------------------ detection
    def check(self, loss: float) -> tuple[str | None, float | None]:
        """Classify one loss value: ``(None | "nonfinite" | "spike", reference)``, without updating the state."""
        if not math.isfinite(loss):
            return "nonfinite", (statistics.median(self.window) if self.window else None)
        if self.healthy < self.warmup or not self.window:
            return None, None
        median = statistics.median(self.window)
        by_median = loss > self.threshold * median
        by_ema = self.ema is not None and loss > self.ema + self.n_sigma * math.sqrt(self.ema_var)
        fired = (by_median and by_ema) if self.mode == "both" else (by_median or by_ema)
        return ("spike" if fired else None), median

    def _accept(self, loss: float) -> None:
        self.window.append(loss)
        self.healthy += 1
        if self.ema is None:
            self.ema = loss
        else:
            diff = loss - self.ema
            self.ema += (1 - self.ema_decay) * diff
            self.ema_var = self.ema_decay * (self.ema_var + (1 - self.ema_decay) * diff * diff)

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach().float())
        kind, reference = self.check(value)
        bad = trainer.strategy.reduce_boolean_decision(kind is not None, all=False)  # any rank bad -> all act
        if not bad:
            self._accept(value)
            self._consecutive = 0
            return
        kind = kind or "spike (on another process)"
        action = self.nonfinite_action if kind == "nonfinite" else self.action
        if action == "skip" and self._consecutive + 1 >= self.max_skips:
            action = "stop"
        event = SpikeEvent(trainer.global_step, self._batch_idx, trainer.current_epoch, value, reference, kind, action)
        self.events.append(event)
        if action == "raise":
            raise FloatingPointError(event.message())
        rank_zero_warn(event.message())
        if action in ("skip", "stop"):
            self._skip_this_step = True
            self._consecutive += 1
        if action == "stop":
            trainer.should_stop = True

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._skip_this_step:
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left untouched by the step
            self._skip_this_step = False

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "ema": self.ema, "ema_var": self.ema_var, "healthy": self.healthy}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.window.extend(state_dict.get("window", []))
        self.ema = state_dict.get("ema")
        self.ema_var = state_dict.get("ema_var", 0.0)
        self.healthy = state_dict.get("healthy", 0)
