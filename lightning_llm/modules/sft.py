"""``SFT``: supervised fine-tuning of a causal LM on instruction data (TRL's ``SFTTrainer`` as a LightningModule).

Batches come from :class:`~lightning_llm.data.sft.SFTDataModule`: ``input_ids (B, T)``, ``targets (B, T)`` (the next
token, ``-100`` where not scored: prompt / non-assistant tokens and padding), ``attention_mask`` and, for packed rows,
``position_ids`` and ``segment_ids`` (attention stays inside each example). The loss is the mean cross-entropy over
scored tokens (TRL's token-level mean). LoRA (``lora``), gradient checkpointing and loading a Hugging Face model
(``pretrained``) come from :class:`~lightning_llm.modules.base.LLMModule`.

Validation logs ``val/loss`` (scored tokens), ``val/token_accuracy`` (greedy next-token accuracy on scored tokens,
TRL's ``mean_token_accuracy``) and, before training, the same two for the initial model as ``baseline/val_loss`` and
``baseline/val_token_accuracy``: the numbers the fine-tuned model has to beat (they land in ``fit_metrics.json``).

Notation: B batch, T row length, V vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import SumMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.modules.causal_lm import CausalLM
from lightning_llm.ops import IGNORE_INDEX, token_logprobs

__all__ = ["SFT"]


class SFT(CausalLM):
    """Supervised fine-tuning on prompt / completion, conversational or plain-text data.

    Args:
        config: architecture when training from scratch (usually ``pretrained`` is given instead).
        baseline: measure the initial model on the validation set before training (``baseline/*`` metrics).
        generation: keyword arguments of :func:`lightning_llm.nn.generate` used by ``predict_step``.
        **kwargs: the shared arguments of :class:`~lightning_llm.modules.base.LLMModule`: ``pretrained`` (a Hugging
            Face directory or a checkpoint of ours), ``lora``, ``gradient_checkpointing``, ``dtype``, ``vocab_size``,
            the optimiser (AdamW, lr 2e-5 like TRL's SFTConfig, no weight decay, 0 warmup by default), ``compile``,
            ``parallel``.
    """

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 2e-5, "weight_decay": 0.0, "warmup_steps": 0}

    def __init__(
        self,
        config: TransformerConfig | None = None,
        baseline: bool = True,
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, generation=generation, **kwargs)
        self.val_loss_sum, self.val_tokens, self.val_correct = SumMetric(), SumMetric(), SumMetric()
        self._baseline_done = False

    # -------------------------------------------------------------------------------------------------- forward
    @staticmethod
    def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: batch[k] for k in ("attention_mask", "position_ids", "segment_ids") if batch.get(k) is not None}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the scored targets (chunked: no full float32 logits)."""
        return self._ensure_model()(batch["input_ids"], targets=batch["targets"], **self._model_inputs(batch))

    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs (B, T), correct (B, T))``: the log-probability of each target (0 where not scored) and whether
        the greedy token is the target."""
        logits = self._ensure_model()(batch["input_ids"], **self._model_inputs(batch))  # (B, T, V)
        targets = batch["targets"]
        logprobs = token_logprobs(logits, targets, ignore_index=IGNORE_INDEX)  # (B, T)
        correct = (logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)  # (B, T)
        return logprobs, correct

    # -------------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/scored_tokens", (batch["targets"] != IGNORE_INDEX).sum().float(), batch_size=bs)
        self.log_lr(bs)
        return loss

    @torch.no_grad()
    def evaluate_loader(self, loader: Any) -> dict[str, float]:
        """``{"loss", "token_accuracy"}`` of the current model over a loader (used for the baseline)."""
        total = tokens = correct = 0.0
        was_training = self.training
        self.eval()
        for batch in loader:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logprobs, ok = self.token_logprobs(batch)
            total -= float(logprobs.sum())
            tokens += float((batch["targets"] != IGNORE_INDEX).sum())
            correct += float(ok.sum())
        self.train(was_training)
        return {"loss": total / max(tokens, 1.0), "token_accuracy": correct / max(tokens, 1.0)}

    def on_train_start(self) -> None:
        if not self.hparams.baseline or self._baseline_done or self.global_step > 0:
            return
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            dm = getattr(self.trainer, "datamodule", None)
            loader = dm.val_dataloader() if dm is not None else None
        if loader is None:
            return
        self._baseline = self.evaluate_loader(loader)
        self._baseline_done = True

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logprobs, correct = self.token_logprobs(batch)
        n = (batch["targets"] != IGNORE_INDEX).sum()
        self.val_loss_sum.update(-logprobs.sum())
        self.val_tokens.update(n)
        self.val_correct.update(correct.sum())

    def _log_eval(self, stage: str) -> None:
        tokens = self.val_tokens.compute().clamp(min=1)
        self.log(f"{stage}/loss", self.val_loss_sum.compute() / tokens, prog_bar=True)
        self.log(f"{stage}/token_accuracy", self.val_correct.compute() / tokens, prog_bar=True)
        for metric in (self.val_loss_sum, self.val_tokens, self.val_correct):
            metric.reset()
        baseline = getattr(self, "_baseline", None)
        if baseline is not None and stage == "val":
            self.log("baseline/val_loss", baseline["loss"])
            self.log("baseline/val_token_accuracy", baseline["token_accuracy"])

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
