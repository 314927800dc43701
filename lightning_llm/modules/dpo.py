"""``DPO``: Direct Preference Optimisation (Rafailov et al. 2023), with the IPO loss as an option (Azar et al. 2023).

``loss = -logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))`` with log-probabilities summed over the
completion tokens (:func:`lightning_llm.rlhf.dpo_loss`). The reference model is a frozen copy of the initial policy;
its log-probabilities are computed on the fly, or once for the whole data set before training
(``precompute_ref_logprobs``, TRL's option of the same name) after which the reference is not run again.

Logged (train/ and val/): ``loss``, ``rewards_chosen`` and ``rewards_rejected`` (the implicit rewards
``beta * (logp - ref_logp)``), ``reward_margin`` (their difference), ``accuracy`` (the preference accuracy: the
fraction of pairs whose chosen implicit reward is the larger), ``logps_chosen`` and ``logps_rejected``.

Notation: B batch of pairs, L padded length, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.modules._common import (
    build_transformer,
    configure_adamw,
    frozen_copy,
    restore_tokenizer,
    save_model_state,
    take_datamodule_tokenizer,
)
from lightning_llm.nn.transformer import Transformer
from lightning_llm.rlhf import dpo_loss, sequence_logprob_sum

__all__ = ["DPO", "completion_logprobs"]

_METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "accuracy", "logps_chosen", "logps_rejected")


def completion_logprobs(
    model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens, ``(B,)``: ``logits[:, :-1]`` scores ``ids[:, 1:]``."""
    logits = model(input_ids, attention_mask=attention_mask)  # (B, L, V)
    return sequence_logprob_sum(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].bool())


class DPO(L.LightningModule):
    """DPO / IPO fine-tuning of a causal LM on preference pairs.

    Args:
        config: architecture of a policy built here (ignored when ``pretrained`` is given).
        pretrained: a local Hugging Face causal LM directory (converted to our Transformer).
        init_from: a Lightning checkpoint (CausalLM / DPO / PPO) whose transformer weights initialise the policy
            (usually the SFT model); the reference is a frozen copy of the initialised policy.
        vocab_size: overrides ``config.vocab_size`` (linked by the CLI).
        beta: the KL strength of the implicit reward (TRL default 0.1).
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"`` (length-averaged log-ratios, as TRL).
        label_smoothing: conservative DPO's assumed label-flip probability (sigmoid only).
        precompute_ref_logprobs: compute the reference log-probabilities of every train / val pair once at the start
            of fit (needs :class:`~lightning_llm.data.preference.PreferenceDataModule`) instead of on the fly.
        learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with warmup + cosine decay.
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        pretrained: str | None = None,
        init_from: str | None = None,
        vocab_size: int | None = None,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_logprobs: bool = False,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"DPO: `loss_type` must be 'sigmoid' or 'ipo', got {loss_type!r}.")
        if not beta > 0:
            raise ValueError(f"DPO: `beta` must be > 0, got {beta}.")
        self.save_hyperparameters()
        self.policy = build_transformer(config, pretrained, vocab_size, init_from)
        self.config = self.policy.config
        self.ref = frozen_copy(self.policy)
        self.tokenizer: Tokenizer | None = None
        self._ref_cache: dict[str, torch.Tensor] = {}
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in _METRICS})

    # -------------------------------------------------------------------------------------------- log-probs
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Policy logits ``(B, L, V)``."""
        return self.policy(input_ids, attention_mask=attention_mask)

    @staticmethod
    def _pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.cat((batch["chosen_input_ids"], batch["rejected_input_ids"]))  # (2B, L)
        attn = torch.cat((batch["chosen_attention_mask"], batch["rejected_attention_mask"]))  # (2B, L)
        loss_mask = torch.cat((batch["chosen_loss_mask"], batch["rejected_loss_mask"]))  # (2B, L)
        return ids, attn, loss_mask

    def _logps(self, model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        lp = completion_logprobs(model, *self._pair(batch))  # (2B,)
        b = batch["chosen_input_ids"].shape[0]
        return lp[:b], lp[b:]

    def _ref_logps(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._ref_cache.get(stage)
        if cache is not None:
            rows = cache[batch["index"].cpu()].to(self.device)  # (B, 2)
            return rows[:, 0], rows[:, 1]
        with torch.no_grad():
            return self._logps(self.ref, batch)

    # -------------------------------------------------------------------------------------------- steps
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr = self._logps(self.policy, batch)
        rc, rr = self._ref_logps(batch, stage)
        lengths = {}
        if self.hparams.loss_type == "ipo":
            lengths = {
                "chosen_lengths": batch["chosen_loss_mask"].sum(1),
                "rejected_lengths": batch["rejected_loss_mask"].sum(1),
            }
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta=self.hparams.beta,
            loss_type=self.hparams.loss_type,
            label_smoothing=self.hparams.label_smoothing,
            **lengths,
        )
        stats = {
            "loss": loss.detach(),
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps_chosen": pc.detach().mean(),
            "logps_rejected": pr.detach().mean(),
        }
        return loss, stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, stats = self._step(batch, "train")
        bs = batch["chosen_input_ids"].shape[0]
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "accuracy"), batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, stats = self._step(batch, "val")
        bs = batch["chosen_input_ids"].shape[0]
        for k, v in stats.items():
            self.val_metrics[k].update(v, weight=bs)
            self.log(f"val/{k}", self.val_metrics[k], prog_bar=k == "accuracy", batch_size=bs)

    # -------------------------------------------------------------------------------------------- reference cache
    @torch.no_grad()
    def precompute_reference(self, datamodule: Any) -> None:
        """Compute the reference log-probabilities of every train and val pair once (``_ref_cache[split]``: (N, 2))."""
        if not (hasattr(datamodule, "dataset") and hasattr(datamodule, "collate_fn")):
            raise TypeError(
                "DPO(precompute_ref_logprobs=True) needs a data module with `dataset(split)` and `collate_fn` "
                f"(PreferenceDataModule); got {type(datamodule).__name__}. Set precompute_ref_logprobs=false."
            )
        for split in ("train", "val"):
            ds = datamodule.dataset(split)
            out = torch.zeros(len(ds), 2)
            for batch in DataLoader(ds, batch_size=64, shuffle=False, collate_fn=datamodule.collate_fn):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                rc, rr = self._logps(self.ref, batch)
                out[batch["index"].cpu()] = torch.stack((rc, rr), dim=1).float().cpu()
            self._ref_cache[split] = out

    def on_fit_start(self) -> None:
        if self.hparams.precompute_ref_logprobs and not self._ref_cache:
            self.precompute_reference(self.trainer.datamodule)

    # -------------------------------------------------------------------------------------------- setup / optim
    def setup(self, stage: str) -> None:
        take_datamodule_tokenizer(self, self.policy, "policy")

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, list(self.policy.parameters()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_model_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_tokenizer(self, checkpoint)
