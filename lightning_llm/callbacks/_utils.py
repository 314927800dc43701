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

import lightning as L
import torch

from lightning_llm.ops import IGNORE_INDEX

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


class PeriodicCallback(L.Callback):
    """A callback whose work (:meth:`on_due_step`) runs at every ``every_n_steps``-th optimizer step, once.

    Design choice: Lightning calls ``on_train_batch_end`` after every micro-batch, so under gradient accumulation one
    ``global_step`` is seen ``accumulate_grad_batches`` times; the step of the last run is remembered and each step
    runs at most once. Other hooks (end of training, end of validation) call :meth:`run_once`, which skips a step that
    already ran. Subclasses set ``every_n_steps`` (``None``: never periodically).
    """

    every_n_steps: int | None = None
    _last_run_step: int = -1

    def on_due_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def run_once(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run :meth:`on_due_step` now unless it already ran at this global step."""
        if trainer.global_step != self._last_run_step:
            self._last_run_step = trainer.global_step
            self.on_due_step(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if is_due(trainer.global_step, self.every_n_steps):
            self.run_once(trainer, pl_module)


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


# ---------------------------------------------------------------------------------------------------- data from YAML
#: local files a dataset argument may name (anything else that is not "embedded" is a Hugging Face dataset name)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")


def check_dataset(arg: str, value: str | None) -> None:
    """Fail at construction when ``value`` names a local file that does not exist (not after an hour of training).

    ``value`` is ``"embedded"`` (the packaged corpus), a local ``.txt``/``.md`` (paragraphs split at blank lines) or
    ``.jsonl``/``.json`` file (a ``"text"`` field per line), or a Hugging Face dataset name."""
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"`{arg}` must be 'embedded', a local file path or a dataset name, got {value!r}.")
    if value == "embedded":
        return
    path = Path(value).expanduser()
    looks_local = value.endswith(TEXT_SUFFIXES) or value.startswith((".", "/", "~"))
    if looks_local and not path.is_file():
        raise FileNotFoundError(
            f"`{arg}`={value!r} does not exist. Expected 'embedded' (the packaged corpus), an existing local "
            f"{'/'.join(TEXT_SUFFIXES)} file, or a Hugging Face dataset name; check the path (relative paths are read "
            f"from the working directory {os.getcwd()!r})."
        )


def load_texts(dataset: str, split: str = "val", text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The documents of ``dataset`` (see :func:`check_dataset`); ``split`` selects the embedded/HF split."""
    check_dataset("dataset", dataset)
    if dataset == "embedded":
        from lightning_llm.evaluation.tasks import embedded_texts

        texts = embedded_texts(split)
    else:
        path = Path(dataset).expanduser()
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            import json

            with path.open(encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            missing = [i for i, r in enumerate(rows) if text_field not in r]
            if missing:
                raise ValueError(f"{dataset}: line {missing[0] + 1} has no {text_field!r} field; set `text_field`.")
            texts = [str(r[text_field]) for r in rows]
        elif path.is_file():
            texts = path.read_text(encoding="utf-8").split("\n\n")
        else:
            import datasets

            texts = list(datasets.load_dataset(dataset, split=split)[text_field])
    texts = [t for t in texts if t and t.strip()][:max_docs]
    if not texts:
        raise ValueError(f"`dataset`={dataset!r} (split {split!r}) holds no non-empty text.")
    return texts


def lm_batches(
    texts: list[str], tokenizer: Any, seq_len: int, batch_size: int, max_batches: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Next-token batches ``{"input_ids", "targets"}`` ``(B, seq_len)`` cut from the packed stream of ``texts``
    (documents joined by EOS), as many as the text allows (at most ``max_batches``)."""
    ids = [i for t in texts for i in [*tokenizer.encode(t), tokenizer.eos_id]]
    stream = torch.tensor(ids, dtype=torch.long)
    n_rows = (stream.numel() - 1) // seq_len
    if n_rows < 1:
        raise ValueError(
            f"the monitoring text has {stream.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower "
            "`seq_len` or pass more text."
        )
    if max_batches is not None:
        n_rows = min(n_rows, max_batches * batch_size)
    x = stream[: n_rows * seq_len].view(n_rows, seq_len)  # (N, T)
    y = stream[1 : n_rows * seq_len + 1].view(n_rows, seq_len)  # (N, T)
    return [
        {"input_ids": x[s : s + batch_size], "targets": y[s : s + batch_size]} for s in range(0, n_rows, batch_size)
    ]


def resolve_tokenizer(tokenizer: Any, trainer: Any, pl_module: Any, who: str) -> Any:
    """The tokenizer a callback uses: ``tokenizer`` (an object, or a path loaded with ``Tokenizer.from_pretrained``),
    else the LightningModule's ``tokenizer``, else the trainer's datamodule's ``tokenizer``."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        from lightning_llm.data.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(tokenizer)
    found = getattr(pl_module, "tokenizer", None)
    if found is None:
        dm = getattr(trainer, "datamodule", None)
        try:
            found = getattr(dm, "tokenizer", None) if dm is not None else None
        except Exception:  # noqa: BLE001 - a datamodule whose tokenizer property cannot be built yet
            found = None
    if found is None:
        raise ValueError(
            f"{who} needs a tokenizer: pass `tokenizer=` (an object or a tokenizer directory), or train with a "
            "LightningModule or a datamodule that has a `tokenizer` attribute (lightning_llm's do)."
        )
    return found


def model_max_length(pl_module: Any) -> int | None:
    """The module's position limit (learned position table), else None."""
    cfg = getattr(pl_module, "config", None) or getattr(getattr(pl_module, "model", None), "config", None)
    if cfg is not None and getattr(cfg, "pos_encoding", None) == "learned":
        return int(cfg.block_size)
    return None


class TextDataCallback(PeriodicCallback):
    """A periodic callback that may read a dataset named in YAML (see :func:`check_dataset`) as next-token batches of
    ``batch_size`` x ``seq_len`` tokens, at most ``max_batches`` of them, tokenized by :func:`resolve_tokenizer`."""

    def __init__(
        self,
        every_n_steps: int | None,
        split: str,
        seq_len: int,
        batch_size: int,
        max_batches: int | None,
        tokenizer: Any,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("seq_len", seq_len), ("batch_size", batch_size)):
            check_every(name, value)
        self.every_n_steps, self.split, self.seq_len, self.batch_size = every_n_steps, split, seq_len, batch_size
        self.max_batches, self.tokenizer = max_batches, tokenizer

    @staticmethod
    def iter_eval(pl_module: Any, batches: Iterable[Any], max_batches: int | None = None) -> Iterator[Any]:
        """``batches`` moved to the module's device, at most ``max_batches``, with the module in eval mode meanwhile."""
        with eval_mode(pl_module):
            yield from iter_batches(batches, pl_module.device, max_batches)

    def _text_batches(self, dataset: str, trainer: Any, pl_module: Any) -> tuple[list[dict[str, torch.Tensor]], Any]:
        """``(batches, tokenizer)`` of ``dataset`` (its ``split``)."""
        tok = resolve_tokenizer(self.tokenizer, trainer, pl_module, type(self).__name__)
        return lm_batches(load_texts(dataset, self.split), tok, self.seq_len, self.batch_size, self.max_batches), tok
