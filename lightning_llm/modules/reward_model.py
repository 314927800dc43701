"""``RewardModel``: a transformer backbone with a scalar head, trained with the Bradley-Terry loss.

The score of a sequence is the head's output at its LAST REAL token (the eos closing the completion), found from the
attention mask, so right padding, left padding (PPO rollouts) and prompt-only masks all work. Batches come from
:class:`~lightning_llm.data.preference.PreferenceDataModule`; chosen and rejected sequences run in one forward pass.

Also holds the small helpers the RLHF modules share: building a backbone (our config, a Hugging Face model from a
local path converted with :func:`lightning_llm.hf.from_hf`, or weights from a checkpoint), storing the tokenizer in a
checkpoint, and the AdamW + warmup-cosine optimiser.

Notation: B batch of pairs, L padded length, C width.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import tokenizers
import torch
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.modules.causal_lm import warmup_cosine_lambda
from lightning_llm.nn.heads import ScalarHead
from lightning_llm.nn.transformer import Transformer
from lightning_llm.rlhf import bradley_terry_loss, last_valid_index

__all__ = ["RewardModel", "build_transformer", "load_transformer_weights", "tokenizer_from_state", "tokenizer_state"]


# ------------------------------------------------------------------------------------------------ shared helpers
def build_transformer(
    config: TransformerConfig | None, pretrained: str | None = None, vocab_size: int | None = None
) -> Transformer:
    """Our :class:`Transformer` from ``config`` (``vocab_size`` overriding it), or a local Hugging Face causal LM
    (``pretrained``) converted with :func:`lightning_llm.hf.from_hf`."""
    if pretrained is not None:
        from transformers import AutoModelForCausalLM

        from lightning_llm.hf import from_hf

        model = from_hf(AutoModelForCausalLM.from_pretrained(pretrained, torch_dtype=torch.float32))
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {vocab_size} tokens but the pretrained model {pretrained!r} only "
                f"{model.config.vocab_size}; use the model's own tokenizer (data tokenizer={pretrained!r})."
            )
        return model
    config = config if config is not None else TransformerConfig()
    if isinstance(config, dict):
        config = TransformerConfig.from_dict(config)
    if vocab_size is not None and vocab_size != config.vocab_size:
        config = TransformerConfig.from_dict({**config.to_dict(), "vocab_size": vocab_size, "padded_vocab_size": None})
    return Transformer(config)


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


def tokenizer_state(tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    """A JSON-able description of a :class:`Tokenizer` (stored in checkpoints)."""
    if tokenizer is None or not hasattr(tokenizer, "backend"):
        return None
    return {
        "json": tokenizer.backend.to_str(),
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "pad_id": tokenizer.pad_id,
        "name": tokenizer.name,
        "fingerprint": tokenizer.fingerprint,
    }


def tokenizer_from_state(state: dict[str, Any] | None) -> Tokenizer | None:
    """Inverse of :func:`tokenizer_state`."""
    if not state:
        return None
    tok = tokenizers.Tokenizer.from_str(state["json"])
    return Tokenizer(
        tok, eos_id=state["eos_id"], bos_id=state["bos_id"], pad_id=state["pad_id"], name=state.get("name")
    )


def configure_adamw(module: L.LightningModule, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """AdamW (decay on matrices only) with linear warmup and cosine decay over the run, from ``module.hparams``."""
    hp = module.hparams
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
    total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer is not None else 1000
    warmup = min(hp.warmup_steps, max(0, total // 2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup, total, hp.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def datamodule_tokenizer(module: L.LightningModule) -> Tokenizer | None:
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(datamodule, "tokenizer", None)


def check_vocab(tokenizer: Tokenizer | None, model: Transformer, what: str) -> None:
    n = getattr(tokenizer, "vocab_size", None)
    if n is not None and n > model.config.vocab_size:
        raise ValueError(
            f"Tokenizer/model vocabulary mismatch: the tokenizer has {n} tokens but the {what}'s vocab_size is "
            f"{model.config.vocab_size}. Set model vocab_size={n} (the CLI links it from data.vocab_size)."
        )


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` (reference models)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# ------------------------------------------------------------------------------------------------ module
class RewardModel(L.LightningModule):
    """Bradley-Terry reward model: ``loss = -logsigmoid(r_chosen - r_rejected - margin)``; logs pairwise accuracy.

    Args:
        config: architecture of a backbone built here (ignored when ``pretrained`` is given).
        pretrained: a local Hugging Face causal LM directory used as the backbone (converted to our Transformer).
        init_from: a Lightning checkpoint (CausalLM, DPO, PPO, RewardModel) whose transformer weights initialise the
            backbone.
        vocab_size: overrides ``config.vocab_size`` (linked by the CLI to the data module's tokenizer).
        use_margin: subtract the batch's ``margin`` (dataset column) inside the loss, as TRL's RewardTrainer.
        center_rewards_coef: optional ``coef * mean((r_c + r_r)^2)`` that keeps rewards centred (Eisenstein et al.).
        learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with warmup + cosine decay.
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        pretrained: str | None = None,
        init_from: str | None = None,
        vocab_size: int | None = None,
        use_margin: bool = True,
        center_rewards_coef: float | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_transformer(config, pretrained, vocab_size)
        if init_from is not None:
            load_transformer_weights(self.backbone, init_from)
        self.config = self.backbone.config
        self.head = ScalarHead(self.config.n_embd)
        self.tokenizer: Tokenizer | None = None
        self.val_loss, self.val_acc, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()

    # -------------------------------------------------------------------------------------------- scoring
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(B,)``: the head at each row's last real token (``attention_mask`` 1s; all tokens when ``None``)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, L, C)
        values = self.head(hidden)  # (B, L)
        last = last_valid_index(attention_mask.bool())  # (B,)
        return values.gather(1, last[:, None]).squeeze(1).float()  # (B,)

    score = forward

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_chosen, r_rejected)``, each ``(B,)``, from one forward pass over the ``2B`` sequences."""
        ids = torch.cat((batch["chosen_input_ids"], batch["rejected_input_ids"]))  # (2B, L)
        mask = torch.cat((batch["chosen_attention_mask"], batch["rejected_attention_mask"]))  # (2B, L)
        r = self(ids, mask)
        b = batch["chosen_input_ids"].shape[0]
        return r[:b], r[b:]

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rc, rr = self.pair_scores(batch)
        margin = batch.get("margin") if self.hparams.use_margin else None
        loss, acc = bradley_terry_loss(rc, rr, margin=margin, center_rewards_coef=self.hparams.center_rewards_coef)
        return loss, acc, (rc - rr).detach().mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, acc, margin = self._loss(batch)
        bs = batch["chosen_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/accuracy", acc, prog_bar=True, batch_size=bs)
        self.log("train/reward_margin", margin, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, acc, margin = self._loss(batch)
        bs = batch["chosen_input_ids"].shape[0]
        self.val_loss.update(loss, weight=bs)
        self.val_acc.update(acc, weight=bs)
        self.val_margin.update(margin, weight=bs)
        self.log("val/loss", self.val_loss, batch_size=bs)
        self.log("val/accuracy", self.val_acc, prog_bar=True, batch_size=bs)
        self.log("val/reward_margin", self.val_margin, batch_size=bs)

    # -------------------------------------------------------------------------------------------- setup / optim
    def setup(self, stage: str) -> None:
        tokenizer = datamodule_tokenizer(self)
        if tokenizer is not None:
            check_vocab(tokenizer, self.backbone, "reward model")
            self.tokenizer = tokenizer

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, list(self.parameters()))

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["transformer_config"] = self.config.to_dict()
        checkpoint["tokenizer"] = tokenizer_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is None:
            self.tokenizer = tokenizer_from_state(checkpoint.get("tokenizer"))

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> RewardModel:
        """Rebuild a trained reward model (architecture, weights, tokenizer) from its checkpoint, frozen, in eval mode.

        The architecture comes from the stored ``transformer_config``, so a backbone that was converted from a Hugging
        Face model loads without that model.
        """
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        if "transformer_config" not in ckpt or not any(k.startswith("head.") for k in ckpt.get("state_dict", {})):
            raise ValueError(
                f"{path!r} is not a RewardModel checkpoint (no 'transformer_config' / 'head.*' weights); pass the "
                "checkpoint written by fitting lightning_llm.modules.RewardModel."
            )
        model = cls(config=TransformerConfig.from_dict(ckpt["transformer_config"]))
        state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("backbone.", "head."))}
        model.load_state_dict(state)
        model.tokenizer = tokenizer_from_state(ckpt.get("tokenizer"))
        model.eval()
        model.requires_grad_(False)
        return model
