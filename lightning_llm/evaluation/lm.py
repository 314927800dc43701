"""One interface over every causal LM the suite evaluates: ``logits(input_ids) -> (B, T, V)``.

Accepted models: our :class:`~lightning_llm.nn.Transformer`, a :class:`~lightning_llm.modules.causal_lm.CausalLM`
(from memory or a ``.ckpt``), a Hugging Face causal LM (in memory or a local directory / hub name), or any
``nn.Module`` whose forward maps ``(B, T)`` ids to logits (or to an object with ``.logits``).

Batches handed to :meth:`LanguageModel.logits` are RIGHT-padded: in a causal model no real token attends to a later
pad, so no attention mask is needed and every model family is served the same way.

Notation: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LanguageModel", "load_model", "load_tokenizer_from_checkpoint"]


class LanguageModel:
    """A causal LM seen as ``logits(input_ids)``, with the facts the report needs (size, context length, FLOPs).

    Args:
        model: the model (see the module docstring).
        device: where to run; default: the model's current device.
        max_length: longest input; default: the model's position limit (learned table / HF ``n_positions``), else
            unbounded (RoPE, ALiBi).
        name: shown in the report.

    Attributes:
        forward_seconds, forward_tokens: time spent in, and tokens (``B * T``) fed to, forward passes so far.
    """

    def __init__(
        self, model: nn.Module, device: str | torch.device | None = None, max_length: int | None = None, name: str = ""
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module (Transformer, CausalLM, a Hugging Face causal LM), got "
                f"{type(model).__name__}. Use `load_model(path)` for a checkpoint or a Hugging Face directory."
            )
        self.module = model
        if device is not None:
            model.to(device)
        model.eval()
        self.name = name or type(model).__name__
        self.max_length = max_length if max_length is not None else self._position_limit()
        self.forward_seconds = 0.0
        self.forward_tokens = 0

    # ------------------------------------------------------------------ facts
    @property
    def inner(self) -> nn.Module:
        """The network itself (``CausalLM.model`` when wrapped)."""
        inner = getattr(self.module, "model", None)
        return inner if isinstance(inner, nn.Module) and hasattr(self.module, "hparams") else self.module

    @property
    def kind(self) -> str:
        inner = self.inner
        if hasattr(inner, "config") and type(inner.config).__name__ == "TransformerConfig":
            return "lightning_llm"
        if hasattr(inner, "config") and hasattr(inner.config, "model_type"):
            return "huggingface"
        return "module"

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _position_limit(self) -> int | None:
        cfg = getattr(self.inner, "config", None)
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
        cfg = getattr(self.inner, "config", None)
        if cfg is not None and hasattr(cfg, "flops_per_token"):
            return float(cfg.flops_per_token(seq_len))
        if cfg is not None and all(
            hasattr(cfg, k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")
        ):
            emb = sum(m.weight.numel() for m in self.inner.modules() if isinstance(m, nn.Embedding))
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


# ---------------------------------------------------------------------------------------------------- loading
def load_tokenizer_from_checkpoint(checkpoint: dict[str, Any]):
    """The tokenizer stored in a CausalLM checkpoint (its JSON) or rebuilt from the saved data-module settings."""
    from lightning_llm.data.tokenizer import Tokenizer

    text = checkpoint.get("tokenizer_json")
    if isinstance(text, str):
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(text)
        eos = checkpoint.get("tokenizer_special_ids", {}).get("eos_id")
        if eos is None:
            eos = Tokenizer._find_eos(backend, "checkpoint tokenizer")
        return Tokenizer(backend, eos_id=eos)
    dm_hparams = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(dm_hparams, dict) and "vocab_size" in dm_hparams and "dataset" in dm_hparams:
        from lightning_llm.data.text import TextDataModule

        known = {k: v for k, v in dm_hparams.items() if k in TextDataModule.__init__.__code__.co_varnames}
        return TextDataModule(**known).tokenizer  # same documents + settings -> the same (cached) BPE
    return None


def load_model(
    spec: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    hf: bool | None = None,
) -> tuple[LanguageModel, Any]:
    """Resolve ``spec`` into a :class:`LanguageModel` and its tokenizer.

    Args:
        spec: a module; a ``.ckpt`` file of :class:`~lightning_llm.modules.causal_lm.CausalLM`; or a Hugging Face
            causal LM directory (``config.json``) or hub name (needs network).
        tokenizer: a :class:`~lightning_llm.data.Tokenizer` or a path/hub name; default: the one that travels in the
            checkpoint, or the Hugging Face model's own.
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        hf: force (True) or forbid (False) the Hugging Face path for a string ``spec``.

    Returns:
        ``(lm, tokenizer)``; ``tokenizer`` may be ``None`` for a bare module given without one.
    """
    from lightning_llm.data.tokenizer import Tokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    if isinstance(spec, nn.Module):
        if tokenizer is None:
            tokenizer = getattr(spec, "tokenizer", None)
        return LanguageModel(spec, device=device), tokenizer
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"`model` must be an nn.Module, a .ckpt path or a Hugging Face model path, got {type(spec).__name__}."
        )
    path = Path(spec).expanduser()
    is_ckpt = path.is_file() and hf is not True
    if is_ckpt:
        from lightning_llm.modules.causal_lm import CausalLM

        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if "state_dict" not in checkpoint:
            raise ValueError(f"`checkpoint`={str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
        module = CausalLM.load_from_checkpoint(path, map_location="cpu")
        if tokenizer is None:
            tokenizer = module.tokenizer if module.tokenizer is not None else load_tokenizer_from_checkpoint(checkpoint)
        if tokenizer is None:
            raise ValueError(
                f"The checkpoint {str(path)!r} carries no tokenizer; pass the one it was trained with "
                "(`--tokenizer DIR`, a directory saved by Tokenizer.save or a Hugging Face tokenizer)."
            )
        module.tokenizer = tokenizer
        return LanguageModel(module, device=device, name=path.name), tokenizer
    if hf is False:
        raise FileNotFoundError(f"`checkpoint`={str(path)!r} does not exist.")
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(
            f"`hf`={str(path)!r} is a directory without config.json: not a Hugging Face model. Save one with "
            "`model.save_pretrained(dir)` (and its tokenizer with `tokenizer.save_pretrained(dir)`)."
        )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else str(spec)).float()
    if tokenizer is None:
        tokenizer = Tokenizer.from_pretrained(str(path) if path.exists() else str(spec))
    return LanguageModel(model, device=device, name=str(spec)), tokenizer
