"""``RewardModel``: a transformer backbone with a scalar head, trained with the Bradley-Terry loss.

The score of a sequence is the head's output at its LAST REAL token (the eos closing the completion), found from the
attention mask, so right padding, left padding (PPO rollouts) and prompt-only masks all work. Batches come from
:class:`~lightning_llm.data.preference.PreferenceDataModule`; chosen and rejected sequences run in one forward pass.

The helpers the RLHF modules share (building a backbone, storing the tokenizer in a checkpoint, the AdamW +
warmup-cosine optimiser) live in :mod:`lightning_llm.modules._common`; the public ones are re-exported here.

Notation: B batch of pairs, L padded length, C width.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.modules._common import (
    build_transformer,
    configure_adamw,
    load_transformer_weights,
    restore_tokenizer,
    save_model_state,
    take_datamodule_tokenizer,
    tokenizer_from_state,
    tokenizer_state,
)
from lightning_llm.nn.heads import ScalarHead
from lightning_llm.rlhf import bradley_terry_loss, last_valid_index

__all__ = ["RewardModel", "build_transformer", "load_transformer_weights", "tokenizer_from_state", "tokenizer_state"]


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
        self.backbone = build_transformer(config, pretrained, vocab_size, init_from)
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
        take_datamodule_tokenizer(self, self.backbone, "reward model")

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, list(self.parameters()))

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_model_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_tokenizer(self, checkpoint)

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
        model.tokenizer = tokenizer_from_state(ckpt)
        model.eval()
        model.requires_grad_(False)
        return model
