"""One interface over every causal LM the suite evaluates: ``logits(input_ids) -> (B, T, V)``.

Accepted models: a path, loaded by :func:`lightning_llm.loading.load_pretrained` (a Hugging Face directory, a
``.ckpt`` of any of our LightningModules, a sharded checkpoint folder) into our
:class:`~lightning_llm.nn.Transformer`; or a module in memory: our ``Transformer``, a LightningModule holding one
(``CausalLM``, ``DPO``, ``PPO``...: the network under ``model`` / ``policy`` / ``backbone`` is used), a Hugging Face
causal LM, or any ``nn.Module`` whose forward maps ``(B, T)`` ids to logits (or to an object with ``.logits``).

Batches handed to :meth:`LanguageModel.logits` are RIGHT-padded: in a causal model no real token attends to a later
pad, so no attention mask is needed and every model family is served the same way.

Notation: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lightning_llm.loading import TRANSFORMER_PREFIXES, load_pretrained, resolve_dtype

__all__ = ["LanguageModel", "LogitsModel", "resolve_model"]


class LogitsModel(Protocol):
    """A torch module whose forward maps ``(B, T)`` token ids to ``(B, T, V)`` next-token logits (or to an object
    with a ``.logits`` attribute, as Hugging Face models return)."""

    def forward(self, input_ids: torch.Tensor) -> Any: ...


def _network(model: nn.Module) -> nn.Module:
    """The network inside a LightningModule (the first of ``model``, ``policy``, ``backbone``), else ``model``."""
    from lightning.pytorch import LightningModule

    if isinstance(model, LightningModule):
        for prefix in TRANSFORMER_PREFIXES:
            inner = getattr(model, prefix.rstrip("."), None)
            if isinstance(inner, nn.Module):
                return inner
    return model


class LanguageModel:
    """A causal LM seen as ``logits(input_ids)``, with the facts the report needs (size, context length, FLOPs).

    Args:
        model: the model (see the module docstring); a LightningModule is unwrapped to the network it holds.
        device: where to run; default: the model's current device.
        max_length: longest input; default: the model's position limit (learned table / HF ``n_positions``), else
            unbounded (RoPE, ALiBi).
        name: shown in the report; default: the class name of ``model``.
        source: the path the model was loaded from (:func:`resolve_model` sets it), or None: where a Hugging Face
            tokenizer's chat template may be read (:class:`~lightning_llm.evaluation.HarnessLM`).

    Attributes:
        module: the network whose forward is called.
        forward_seconds, forward_tokens: time spent in, and tokens (``B * T``) fed to, forward passes so far.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        name: str = "",
        source: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module (Transformer, CausalLM, a Hugging Face causal LM), got "
                f"{type(model).__name__}. Use `resolve_model(path)` for a checkpoint or a Hugging Face directory."
            )
        self.name = name or type(model).__name__
        self.source = source
        self.module = _network(model)
        if device is not None:
            self.module.to(device)
        self.module.eval()
        self.max_length = max_length if max_length is not None else self._position_limit()
        self.forward_seconds = 0.0
        self.forward_tokens = 0

    # ------------------------------------------------------------------ facts
    @property
    def kind(self) -> str:
        """``"lightning_llm"`` (our Transformer), ``"huggingface"`` or ``"module"``."""
        cfg = getattr(self.module, "config", None)
        if type(cfg).__name__ == "TransformerConfig":
            return "lightning_llm"
        if hasattr(cfg, "model_type"):
            return "huggingface"
        return "module"

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _position_limit(self) -> int | None:
        cfg = getattr(self.module, "config", None)
        if cfg is None:
            return None
        if type(cfg).__name__ == "TransformerConfig":
            return cfg.block_size if cfg.pos_encoding == "learned" else None
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def flops_per_token(self, seq_len: int) -> float | None:
        """Training FLOPs per token ``6N + 12 L H Q T`` (forward only is a third), when the architecture is known."""
        cfg = getattr(self.module, "config", None)
        if cfg is not None and hasattr(cfg, "flops_per_token"):
            return float(cfg.flops_per_token(seq_len))
        if cfg is not None and all(
            hasattr(cfg, k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")
        ):
            emb = sum(m.weight.numel() for m in self.module.modules() if isinstance(m, nn.Embedding))
            n = self.num_parameters() - emb
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return float(6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len)
        return None

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids (right-padded) -> ``(B, T, V)`` logits, float32, on the CPU."""
        input_ids = input_ids.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.module(input_ids)
        out = getattr(out, "logits", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - start
        self.forward_tokens += input_ids.numel()
        if out.dim() == 2 and out.shape[0] == input_ids.numel():  # (B*T, V) flattened outputs
            out = out.view(*input_ids.shape, -1)  # (B, T, V)
        if out.dim() != 3 or out.shape[:2] != input_ids.shape:
            raise ValueError(
                f"The model must return logits of shape (batch, seq_len, vocab) = ({input_ids.shape[0]}, "
                f"{input_ids.shape[1]}, V), got {tuple(out.shape)}. Wrap it in a module whose forward(input_ids) "
                "returns next-token logits."
            )
        return out.float().cpu()


def resolve_model(
    model: str | os.PathLike | nn.Module | LanguageModel,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[LanguageModel, Any]:
    """``model`` (a path or a module) and ``tokenizer`` as a :class:`LanguageModel` and a tokenizer.

    Args:
        model: a path for :func:`~lightning_llm.loading.load_pretrained`, a module (see the module docstring) or a
            :class:`LanguageModel` (used as it is).
        tokenizer: a :class:`~lightning_llm.data.Tokenizer`, or a tokenizer directory / Hugging Face name; default:
            the one stored with the model (a checkpoint's, a Hugging Face directory's, a module's ``tokenizer``).
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available (a :class:`LanguageModel` stays where it is).
        dtype: parameter dtype (``"bfloat16"``, ``torch.float16``...); default: as loaded / as given.

    Returns:
        ``(lm, tokenizer)``; ``tokenizer`` is ``None`` when none was given and none travels with the model.
    """
    from lightning_llm.data.tokenizer import Tokenizer

    dtype = resolve_dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).expanduser().exists():
            raise FileNotFoundError(
                f"`model`={str(model)!r} does not exist; pass a Hugging Face model directory, a .ckpt file of a "
                "lightning_llm module or a sharded checkpoint folder."
            )
        by_path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        network, stored = load_pretrained(model, device=device, dtype=dtype, tokenizer=by_path)
        lm = LanguageModel(network, name=Path(model).name, source=str(model))
        return lm, stored if tokenizer is None or by_path else tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    if isinstance(model, LanguageModel):
        for target in (device, dtype):
            if target is not None:
                model.module.to(target)
        return model, tokenizer
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a path (a Hugging Face directory, a .ckpt file, a sharded checkpoint folder) or a "
            f"torch.nn.Module, got {type(model).__name__}."
        )
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if dtype is not None:
        model.to(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LanguageModel(model, device=device), tokenizer
