"""Helpers shared by the RLHF LightningModules (:class:`~lightning_llm.modules.RewardModel`,
:class:`~lightning_llm.modules.DPO`, :class:`~lightning_llm.modules.PPO`).

* building a backbone: our config, a Hugging Face model from a local path converted with
  :func:`lightning_llm.hf.from_hf`, and optionally weights from a checkpoint of any of our modules;
* the data module's tokenizer: taken over in ``setup`` after a vocabulary check;
* checkpoints: the transformer config and the tokenizer, stored as :class:`~lightning_llm.modules.CausalLM` stores it
  (``tokenizer_json`` = :meth:`Tokenizer.to_str`, ``tokenizer_special_ids`` = :attr:`Tokenizer.special_ids`);
* the optimiser: AdamW (weight decay on matrices only), with linear warmup + cosine decay
  (:func:`~lightning_llm.modules.causal_lm.warmup_cosine_lambda`) over the run.

Notation: ``hp`` is a module's ``hparams``; "matrices" are parameters with ``dim() >= 2``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.modules.causal_lm import warmup_cosine_lambda
from lightning_llm.nn.transformer import Transformer

__all__ = [
    "adamw",
    "build_transformer",
    "check_vocab",
    "configure_adamw",
    "copy_module",
    "datamodule_tokenizer",
    "frozen_copy",
    "load_transformer_weights",
    "restore_tokenizer",
    "save_model_state",
    "take_datamodule_tokenizer",
    "tokenizer_from_state",
    "tokenizer_state",
]


# ------------------------------------------------------------------------------------------------ backbone
def build_transformer(
    config: TransformerConfig | None,
    pretrained: str | None = None,
    vocab_size: int | None = None,
    init_from: str | None = None,
) -> Transformer:
    """Our :class:`Transformer` from ``config`` (``vocab_size`` overriding it), or a local Hugging Face causal LM
    (``pretrained``) converted with :func:`lightning_llm.hf.from_hf`; then the weights of the Lightning checkpoint
    ``init_from`` when given (:func:`load_transformer_weights`)."""
    if pretrained is not None:
        from transformers import AutoModelForCausalLM

        from lightning_llm.hf import from_hf

        model = from_hf(AutoModelForCausalLM.from_pretrained(pretrained, torch_dtype=torch.float32))
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {vocab_size} tokens but the pretrained model {pretrained!r} only "
                f"{model.config.vocab_size}; use the model's own tokenizer (data tokenizer={pretrained!r})."
            )
    else:
        config = config if config is not None else TransformerConfig()
        if isinstance(config, dict):
            config = TransformerConfig.from_dict(config)
        if vocab_size is not None and vocab_size != config.vocab_size:
            config = TransformerConfig.from_dict(
                {**config.to_dict(), "vocab_size": vocab_size, "padded_vocab_size": None}
            )
        model = Transformer(config)
    if init_from is not None:
        load_transformer_weights(model, init_from)
    return model


def load_transformer_weights(
    model: Transformer, path: str, prefixes: tuple[str, ...] = ("model.", "policy.", "backbone.")
) -> None:
    """Load a :class:`Transformer`'s weights from a Lightning checkpoint of CausalLM / DPO / PPO / RewardModel.

    The first prefix under which the checkpoint holds ``wte.weight`` is used (``model.`` for CausalLM, ``policy.`` for
    DPO and PPO, ``backbone.`` for RewardModel).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    for prefix in prefixes:
        if f"{prefix}wte.weight" in state:
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            model.load_state_dict(sub)
            return
    raise ValueError(
        f"`init_from`={path!r} holds no transformer weights under any of the prefixes {list(prefixes)}; pass a "
        "checkpoint written by CausalLM, DPO, PPO or RewardModel."
    )


def _deep_copy(module: torch.nn.Module, trainable: bool) -> torch.nn.Module:
    out = copy.deepcopy(module)
    out.train(trainable)
    out.requires_grad_(trainable)
    return out


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` (reference models)."""
    return _deep_copy(model, trainable=False)


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """A trainable deep copy, in train mode with ``requires_grad=True`` (e.g. of the frozen reward model)."""
    return _deep_copy(module, trainable=True)


# ------------------------------------------------------------------------------------------------ tokenizer
def datamodule_tokenizer(module: L.LightningModule) -> Tokenizer | None:
    """The ``tokenizer`` of the trainer's data module, or ``None`` (no trainer, no data module, no tokenizer)."""
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(datamodule, "tokenizer", None)


def check_vocab(tokenizer: Tokenizer | None, model: Transformer, what: str) -> None:
    """Raise when ``tokenizer`` has more ids than ``model``'s vocabulary (``what`` names the model in the message)."""
    n = getattr(tokenizer, "vocab_size", None)
    if n is not None and n > model.config.vocab_size:
        raise ValueError(
            f"Tokenizer/model vocabulary mismatch: the tokenizer has {n} tokens but the {what}'s vocab_size is "
            f"{model.config.vocab_size}. Set model vocab_size={n} (the CLI links it from data.vocab_size)."
        )


def take_datamodule_tokenizer(module: L.LightningModule, model: Transformer, what: str) -> Tokenizer | None:
    """``setup`` glue: check the data module's tokenizer against ``model`` and store it as ``module.tokenizer``.

    Returns the tokenizer, or ``None`` (``module.tokenizer`` left as it is) when the data module has none.
    """
    tokenizer = datamodule_tokenizer(module)
    if tokenizer is not None:
        check_vocab(tokenizer, model, what)
        module.tokenizer = tokenizer
    return tokenizer


def tokenizer_state(tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    """The checkpoint entries of a :class:`Tokenizer`, as CausalLM writes them: ``{"tokenizer_json":
    tokenizer.to_str(), "tokenizer_special_ids": tokenizer.special_ids}``; ``None`` without a tokenizer."""
    if tokenizer is None or not hasattr(tokenizer, "to_str"):
        return None
    return {"tokenizer_json": tokenizer.to_str(), "tokenizer_special_ids": dict(tokenizer.special_ids)}


def tokenizer_from_state(state: dict[str, Any] | None) -> Tokenizer | None:
    """Inverse of :func:`tokenizer_state`; ``state`` may be a whole checkpoint (CausalLM's too).

    Also reads the RLHF modules' former entry ``checkpoint["tokenizer"] = {"json", "eos_id", "bos_id", "pad_id",
    "name"}`` (given as the checkpoint or as that dict). ``None`` when no tokenizer is stored.
    """
    if not state:
        return None
    if "tokenizer_json" in state:
        return Tokenizer.from_str(state["tokenizer_json"], **state.get("tokenizer_special_ids", {}))
    legacy = state.get("tokenizer", state)
    if not isinstance(legacy, dict) or "json" not in legacy:
        return None
    tokenizer = Tokenizer.from_str(
        legacy["json"], eos_id=legacy["eos_id"], bos_id=legacy["bos_id"], pad_id=legacy["pad_id"]
    )
    tokenizer.name = legacy.get("name")
    return tokenizer


# ------------------------------------------------------------------------------------------------ checkpoints
def save_model_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` glue: store ``module.config`` (``transformer_config``) and ``module.tokenizer``."""
    checkpoint["transformer_config"] = module.config.to_dict()
    checkpoint.update(tokenizer_state(module.tokenizer) or {})


def restore_tokenizer(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint`` glue: ``module.tokenizer`` from the checkpoint, unless the module already has one."""
    if module.tokenizer is None:
        module.tokenizer = tokenizer_from_state(checkpoint)


# ------------------------------------------------------------------------------------------------ optimiser
def adamw(hp: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over the trainable ``params``: ``hp.weight_decay`` on matrices, none on vectors; ``hp.learning_rate``,
    ``hp.betas``."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))


def configure_adamw(module: L.LightningModule, params: Iterable[torch.nn.Parameter]) -> dict[str, Any]:
    """:func:`adamw` with linear warmup and cosine decay over the run, from ``module.hparams``."""
    hp = module.hparams
    optimizer = adamw(hp, params)
    total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer is not None else 1000
    warmup = min(hp.warmup_steps, max(0, total // 2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup, total, hp.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
