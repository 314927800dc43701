"""``LLMThroughputMonitor``: tokens/s and model FLOPs utilisation, on top of Lightning's ``ThroughputMonitor``.

FLOPs per token follow PaLM (appendix B): ``6 N + 12 L H Q T`` for a training step (N non-embedding parameters, L
layers, H heads, Q head dim, T sequence length); a forward pass is a third of it. The count comes from, in order:

1. ``flops_per_token`` given as a number;
2. ``config`` (a :class:`~lightning_llm.config.TransformerConfig`, or found as ``module.config`` / ``module.model.config``);
3. ``n_layer``, ``n_head``, ``head_dim`` given, N counted from the module's parameters minus its embedding tables;
4. ``flops_per_token="measure"``: Lightning's :func:`~lightning.fabric.utilities.throughput.measure_flops` (torch's
   FLOP counter) on the first training batch, forward + backward, divided by its tokens.

MFU = achieved FLOP/s / ``peak_flops`` (default: Lightning's table of GPU peaks for the precision; give it on CPU).
Besides Lightning's own ``train/device/...`` keys, the callback logs ``throughput/tokens_per_sec``,
``throughput/flops_per_sec`` and ``throughput/mfu`` over the last ``log_every_n_steps`` steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn

from lightning_llm.callbacks._utils import BatchFn, default_batch_fn


def _tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    if isinstance(batch, (tuple, list)):
        return int(batch[0].numel())
    return int(batch.numel())


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[0])
    if isinstance(batch, (tuple, list)):
        return int(batch[0].shape[0])
    return int(batch.shape[0])


def _seq_len(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[-1])
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[-1])


def non_embedding_parameters(module: nn.Module) -> int:
    """Parameters outside ``nn.Embedding`` tables (a tied output projection counts once, as an embedding)."""
    embedding = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if id(p) not in embedding)


def palm_flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token ``6 N + 12 L H Q T``."""
    return float(6 * n_params + 12 * n_layer * n_head * head_dim * seq_len)


def _find_config(module: nn.Module) -> Any:
    for obj in (module, getattr(module, "model", None)):
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "flops_per_token"):
            return cfg
    return None


class LLMThroughputMonitor(ThroughputMonitor):
    """Tokens/s and MFU for any LightningModule.

    Args:
        flops_per_token: a number, ``"measure"``, or ``None`` (use ``config`` / ``n_layer`` ... / nothing).
        config: a TransformerConfig (default: found on the module).
        n_layer, n_head, head_dim: the architecture of a foreign model for ``6N + 12LHQT``.
        peak_flops: the device's peak FLOP/s for MFU (e.g. 989e12 for an H100 in bf16); default: Lightning's table.
        batch_fn: used by ``"measure"`` to run forward + backward on the first batch.
        log_every_n_steps: window of the ``throughput/*`` keys.
        window_size: Lightning's ``Throughput`` window (batches).
        batch_size_fn, length_fn: Lightning's; defaults read dict or tuple batches (``length`` = tokens).
    """

    def __init__(
        self,
        flops_per_token: float | str | None = None,
        config: Any = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        head_dim: int | None = None,
        peak_flops: float | None = None,
        batch_fn: BatchFn | None = None,
        log_every_n_steps: int = 10,
        window_size: int = 10,
        batch_size_fn: Callable[[Any], int] | None = None,
        length_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__(batch_size_fn or _batch_size, length_fn or _tokens, window_size=window_size)
        if isinstance(flops_per_token, str) and flops_per_token != "measure":
            raise ValueError(f"`flops_per_token` must be a number, 'measure' or None, got {flops_per_token!r}.")
        if isinstance(flops_per_token, (int, float)) and flops_per_token <= 0:
            raise ValueError(f"`flops_per_token` must be > 0, got {flops_per_token!r}.")
        self.flops_per_token_arg = flops_per_token
        self.config = config
        self.arch = (n_layer, n_head, head_dim)
        self.peak_flops = peak_flops
        self.batch_fn = batch_fn or default_batch_fn
        self.log_every_n_steps = log_every_n_steps
        self._measured: dict[int, float] = {}
        self._window: list[tuple[float, int, float]] = []  # (time, tokens, flops)
        self._set_attr = False
        self.last: dict[str, float] = {}

    def flops_per_token(self, pl_module: nn.Module, seq_len: int, batch: Any = None) -> float | None:
        """Training FLOPs per token at ``seq_len`` (see the module docstring for the sources)."""
        arg = self.flops_per_token_arg
        if isinstance(arg, (int, float)):
            return float(arg)
        if arg == "measure":
            if seq_len not in self._measured and batch is not None:
                self._measured[seq_len] = self._measure(pl_module, batch)
            return self._measured.get(seq_len)
        cfg = self.config or _find_config(pl_module)
        if cfg is not None:
            return float(cfg.flops_per_token(seq_len))
        if all(v is not None for v in self.arch):
            n_layer, n_head, head_dim = self.arch
            return palm_flops_per_token(non_embedding_parameters(pl_module), n_layer, n_head, head_dim, seq_len)
        return None

    def _measure(self, pl_module: nn.Module, batch: Any) -> float:
        from lightning.fabric.utilities.throughput import measure_flops

        def forward() -> torch.Tensor:
            logits, _ = self.batch_fn(pl_module, batch)
            return logits

        flops = measure_flops(pl_module, forward, loss_fn=lambda out: out.float().sum())
        pl_module.zero_grad(set_to_none=True)
        return flops / _tokens(batch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops
        if not hasattr(pl_module, "flops_per_batch"):
            pl_module.flops_per_batch = None  # Lightning's ThroughputMonitor reads this attribute; we keep it current
            self._set_attr = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._set_attr and hasattr(pl_module, "flops_per_batch"):
            del pl_module.flops_per_batch
            self._set_attr = False

    def _batch_flops(self, pl_module: nn.Module, batch: Any, training: bool) -> float | None:
        fpt = self.flops_per_token(pl_module, _seq_len(batch), batch)
        if fpt is None:
            return None
        return fpt * _tokens(batch) * (1.0 if training else 1.0 / 3.0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._set_attr:
            pl_module.flops_per_batch = self._batch_flops(pl_module, batch, training=True)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._set_attr:
            pl_module.flops_per_batch = self._batch_flops(pl_module, batch, training=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        flops = self._batch_flops(pl_module, batch, training=True)
        self._window.append((time.perf_counter(), _tokens(batch) * trainer.world_size, flops or 0.0))
        if len(self._window) > self.log_every_n_steps:
            (t0, _, _), rest = self._window[0], self._window[1:]
            elapsed = rest[-1][0] - t0
            tokens = sum(n for _, n, _ in rest)
            metrics = {"throughput/tokens_per_sec": tokens / elapsed}
            if flops is not None:
                flops_per_sec = sum(f for _, _, f in rest) / elapsed  # per device
                metrics["throughput/flops_per_sec"] = flops_per_sec
                if self.available_flops:
                    metrics["throughput/mfu"] = flops_per_sec / self.available_flops
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self.last = metrics
            self._window = self._window[-1:]
