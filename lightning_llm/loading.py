"""The one way in: :func:`load_pretrained` turns any model path this project reads into ``(Transformer, Tokenizer)``.

Accepted paths:

* a Hugging Face causal-LM directory (``config.json`` + weights; Llama, GPT-NeoX, BLOOM, GPT-2 shaped), converted
  with :func:`lightning_llm.hf.from_hf`; its tokenizer is read from the same directory;
* a ``.ckpt`` file written by any of our LightningModules (CausalLM, SFT, RewardModel, DPO, PPO, ...): the
  architecture comes from the stored ``transformer_config``, the weights from the first module prefix that holds a
  transformer (``model.``, ``policy.``, ``backbone.``), the tokenizer from the stored tokenizer JSON;
* a sharded checkpoint folder (``torch.distributed.checkpoint``, written by FSDP2 / tensor parallel), read without a
  process group by :func:`lightning_llm.parallel.consolidate.load_sharded_checkpoint`.

Every checkpoint is read with :func:`lightning_llm.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``):
a checkpoint can never run code when it is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.transformer import Transformer

__all__ = ["TRANSFORMER_PREFIXES", "config_of", "load_pretrained", "read_checkpoint", "transformer_from_checkpoint"]

#: where each LightningModule keeps its Transformer inside ``state_dict``
TRANSFORMER_PREFIXES = ("model.", "policy.", "backbone.")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPES.update({"float16": torch.float16, "fp16": torch.float16, "half": torch.float16})


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or one of its names (``"bfloat16"``, ``"bf16"``, ``"float16"``, ``"float32"``...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}.")
    return _DTYPES[key]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint of ours as one dict in the single-device Trainer layout: a ``.ckpt`` file (read safely) or a
    sharded folder (consolidated in memory)."""
    path = Path(path).expanduser()
    if path.is_dir():
        from lightning_llm.parallel.consolidate import load_sharded_checkpoint

        return load_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    from lightning_llm.checkpoint import load_checkpoint

    return load_checkpoint(path)


def config_of(checkpoint: dict[str, Any], where: str = "the checkpoint") -> TransformerConfig:
    """The :class:`TransformerConfig` a checkpoint of ours stores (``transformer_config``, else the module's ``config``
    hyper-parameter)."""
    config = checkpoint.get("transformer_config")
    if config is None:  # older checkpoints: the module's `config` hyper-parameter
        config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    raise ValueError(
        f"{where} stores no transformer architecture (no 'transformer_config'): it was not written by a "
        "lightning_llm module, or by one wrapping an unconverted Hugging Face model. Pass a checkpoint of ours, or the "
        "Hugging Face directory itself."
    )


def transformer_from_checkpoint(
    checkpoint: dict[str, Any], where: str = "the checkpoint", prefixes: tuple[str, ...] = TRANSFORMER_PREFIXES
) -> Transformer:
    """Our :class:`Transformer` with the weights a checkpoint dict holds under the first matching prefix."""
    state = checkpoint.get("state_dict", checkpoint)
    for prefix in prefixes:
        if f"{prefix}wte.weight" in state:
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            model = Transformer(config_of(checkpoint, where))
            missing, unexpected = model.load_state_dict(sub, strict=False)
            missing = [k for k in missing if not k.endswith(("rope.inv_freq", "alibi_slopes"))]
            if missing or unexpected:
                raise ValueError(
                    f"{where}: the weights under {prefix!r} do not fit the stored architecture (missing {missing[:4]}, "
                    f"unexpected {unexpected[:4]}). The checkpoint is damaged or was edited."
                )
            return model
    raise ValueError(
        f"{where} holds no transformer weights under any of the prefixes {list(prefixes)}; pass a checkpoint written "
        "by CausalLM, SFT, DPO, PPO, GRPO or RewardModel."
    )


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | os.PathLike | None = None,
    merge: bool = True,
) -> tuple[Transformer, Any]:
    """Load a model and its tokenizer from a Hugging Face directory, a checkpoint file of ours or a sharded folder.

    A LoRA checkpoint of ours (adapters plus a reference to the base they were trained on) loads as its base (read
    with this function, recursively) with the stored adapters: merged into the weights when ``merge``, else left as
    peft LoRA layers (what ``lightning-llm export`` writes as a separate adapter).

    Args:
        path: the model (see the module docstring for the accepted kinds).
        device: where to put the model (default: where it was loaded, the CPU).
        dtype: parameter dtype (``"bfloat16"``, ``torch.float16``...); default: float32 for checkpoints, the stored
            dtype for Hugging Face weights.
        tokenizer: a tokenizer directory or Hugging Face name to use instead of the one stored with the model.
        merge: for a LoRA checkpoint, fold the adapters into the base weights.

    Returns:
        ``(model, tokenizer)``: ``model`` is a :class:`Transformer` in eval mode (``model(input_ids) -> logits``);
        ``tokenizer`` a :class:`~lightning_llm.data.Tokenizer`, or ``None`` when the checkpoint carries none and
        no ``tokenizer`` was given.
    """
    from lightning_llm.data.tokenizer import Tokenizer

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a path (str or os.PathLike), got {type(path).__name__}.")
    dtype = resolve_dtype(dtype)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"`path`={str(path)!r} does not exist; pass a Hugging Face model directory, a .ckpt file or a sharded "
            "checkpoint folder."
        )
    if p.is_dir() and (p / "config.json").is_file():
        from lightning_llm.hf import from_hf

        model = from_hf(p, dtype=dtype)
        tok = Tokenizer.from_pretrained(tokenizer or p) if (tokenizer or _has_tokenizer(p)) else None
    elif p.is_file() or (p / ".metadata").is_file():
        from lightning_llm.data.tokenizer import tokenizer_from_state

        checkpoint = read_checkpoint(p)
        where = f"checkpoint {str(p)!r}"
        base_tok = None
        if isinstance(checkpoint.get("lora"), dict) and checkpoint["lora"].get("base") is not None:
            from lightning_llm.nn.lora import load_lora_checkpoint

            model, base_tok = load_lora_checkpoint(
                checkpoint, lambda base: load_pretrained(base, dtype=dtype), where=where, merge=merge
            )
        else:
            model = transformer_from_checkpoint(checkpoint, where=where)
        if dtype is not None:
            model = model.to(dtype)
        if tokenizer is not None:
            tok = Tokenizer.from_pretrained(tokenizer)
        else:
            tok = tokenizer_from_state(checkpoint) or base_tok
    else:
        raise ValueError(
            f"`path`={str(path)!r} is a folder with neither config.json (a Hugging Face model) nor .metadata (a "
            "sharded checkpoint). Save a Hugging Face model with `save_pretrained(dir)` or pass a .ckpt file."
        )
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
