"""``RewardModel``: a transformer backbone with a scalar head, trained with the Bradley-Terry loss.

The score of a sequence is the head's output at its last attended token that is not the pad id: Hugging Face's
sequence-classification rule, which TRL's ``RewardTrainer`` uses. When the pad id is also the eos id (GPT-2-style
tokenizers, our byte-level BPE) that is the token before the closing eos; rows made only of pad ids fall back to the
last attended token. Right padding, left padding (PPO rollouts) and prompt-only masks all work. Batches come from
:class:`~lightning_llm.data.preference.PreferenceDataModule`; chosen and rejected sequences run in one forward pass.

Notation: B batch of pairs, L padded length, C width.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import MeanMetric

from lightning_llm.checkpoint import load_checkpoint
from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import tokenizer_from_state
from lightning_llm.loading import transformer_from_checkpoint
from lightning_llm.modules.base import LLMModule
from lightning_llm.nn.heads import ScalarHead
from lightning_llm.nn.transformer import Transformer
from lightning_llm.rlhf import bradley_terry_loss, last_valid_index

__all__ = ["RewardModel", "freeze_lm_head"]


def freeze_lm_head(backbone: Transformer) -> Transformer:
    """Freeze the output projection (``lm_head``) of a backbone that scores through a scalar head; in place.

    A reward or value model reads ``backbone(..., return_hidden=True)`` and never projects to the vocabulary, so an
    untied ``lm_head`` gets no gradient in any backward. Left trainable, it stops DDP with
    ``find_unused_parameters=False`` (the ``cpu_ddp`` / ``gpu_ddp`` presets, :func:`~lightning_llm.parallel.ddp`,
    Lightning's ``"ddp"``) at the second backward ("parameters that were not used in producing the loss"); the
    alternative, ``find_unused_parameters=True``, would make DDP walk the autograd graph at every backward to find this
    one tensor. Frozen, it is outside DDP's gradient buckets and the optimiser, and nothing else changes: it never had a
    gradient (so no optimiser state, no weight decay), and it stays in the state dict, so the backbone still loads as a
    complete causal LM (:func:`~lightning_llm.load_pretrained`) and older checkpoints load unchanged. Tied embeddings
    (no ``lm_head``: the input embedding, which is used) need nothing.
    """
    if backbone.lm_head is not None:
        backbone.lm_head.requires_grad_(False)
    return backbone


# ------------------------------------------------------------------------------------------------ module
class RewardModel(LLMModule):
    """Bradley-Terry reward model: ``loss = -logsigmoid(r_chosen - r_rejected - margin)``; logs pairwise accuracy.

    Args:
        use_margin: subtract the batch's ``margin`` (dataset column) inside the loss, as TRL's RewardTrainer.
        center_rewards_coef: optional ``coef * mean((r_c + r_r)^2)`` that keeps rewards centred (Eisenstein et al.).
        **kwargs: the shared arguments of :class:`~lightning_llm.modules.base.LLMModule`: ``config`` or
            ``pretrained`` (a Hugging Face directory or a checkpoint of any of our modules: its transformer
            initialises the backbone), ``vocab_size``, ``dtype``, the optimiser (AdamW, lr 1e-3, no weight decay,
            20 warmup steps, cosine decay by default), ``compile``, ``parallel``.
    """

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-3, "weight_decay": 0.0, "warmup_steps": 20}

    def __init__(
        self,
        config: TransformerConfig | None = None,
        use_margin: bool = True,
        center_rewards_coef: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        self.backbone: Transformer | None = None
        self.head: ScalarHead | None = None
        self.val_loss, self.val_acc, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.configure_model()  # eager: the head and the backbone exist from construction

    def build(self) -> None:
        self.backbone = freeze_lm_head(self.build_backbone())  # scores come from the head: see freeze_lm_head
        self.head = ScalarHead(self.config.n_embd)

    def transformers(self) -> list[torch.nn.Module]:
        return [self.backbone]

    def heads(self) -> list[torch.nn.Module]:
        return [self.head]

    # -------------------------------------------------------------------------------------------- scoring
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(B,)``: the head at each row's last attended non-pad token (see the module docstring)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, L, C)
        values = self.head(hidden)  # (B, L)
        valid = attention_mask.bool()  # (B, L)
        pad_id = getattr(self.tokenizer, "pad_id", None)
        if pad_id is not None:
            non_pad = valid & (input_ids != pad_id)
            valid = torch.where(non_pad.any(1, keepdim=True), non_pad, valid)
        last = last_valid_index(valid)  # (B,)
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
        self.log_lr(bs)
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

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> RewardModel:
        """Rebuild a trained reward model (architecture, weights, tokenizer) from its checkpoint, frozen, in eval mode.

        The architecture comes from the stored ``transformer_config``, so a backbone that was converted from a Hugging
        Face model loads without that model.
        """
        ckpt = load_checkpoint(path, map_location=map_location)
        state = ckpt.get("state_dict", {})
        if "transformer_config" not in ckpt or not any(k.startswith("head.") for k in state):
            raise ValueError(
                f"{str(path)!r} is not a RewardModel checkpoint (no 'transformer_config' / 'head.*' weights); pass the "
                "checkpoint written by fitting lightning_llm.modules.RewardModel."
            )
        where = f"reward model {str(path)!r}"
        if isinstance(ckpt.get("lora"), dict) and ckpt["lora"].get("base") is not None:  # adapters + a base reference
            from lightning_llm.loading import load_pretrained
            from lightning_llm.nn.lora import load_lora_checkpoint

            backbone, _ = load_lora_checkpoint(
                ckpt, lambda base: load_pretrained(base), prefixes=("backbone.",), where=where
            )
        else:
            backbone = transformer_from_checkpoint(ckpt, where=where, prefixes=("backbone.",))
        model = cls(config=backbone.config)
        model.backbone.load_state_dict(backbone.state_dict())
        model.head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        model.tokenizer = tokenizer_from_state(ckpt)
        model.eval()
        model.requires_grad_(False)
        return model
