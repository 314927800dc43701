"""``SFT``: supervised fine-tuning of a causal LM on instruction data (TRL's ``SFTTrainer`` as a LightningModule).

Batches come from :class:`~lightning_llm.data.sft.SFTDataModule`: ``input_ids (B, T)``, ``targets (B, T)`` (the next
token, ``-100`` where not scored: prompt / non-assistant tokens and padding), ``attention_mask`` and, for packed rows,
``position_ids`` and ``segment_ids`` (attention stays inside each example). The loss is the mean cross-entropy over
scored tokens (TRL's token-level mean). LoRA (``lora``), gradient checkpointing and loading a Hugging Face model
(``pretrained``) come from :class:`~lightning_llm.modules.base.LLMModule`.

The training loss projects to the vocabulary only the positions that are scored (in SFT the prompt, the padding and
every non-assistant token are not: often half the row or more), in chunks of at most 64 MiB of float32 logits on CPU,
8 MiB when the output layer is frozen (:func:`~lightning_llm.nn.heads.chunked_cross_entropy`), so the output layer,
the largest matrix of a fine-tuned model, costs in proportion to the completion tokens and no ``(B, T, V)`` logits
exist. The default AdamW is the fused (single-kernel) one wherever torch has it for the parameters
(:meth:`~lightning_llm.modules.base.LLMModule.make_optimizer`, shared by every module).

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
from lightning_llm.nn.heads import chunked_cross_entropy
from lightning_llm.ops import IGNORE_INDEX, chunk_rows, is_plain, token_logprobs

#: float32 logits per chunk of the training loss on CPU when the output layer trains: each chunk adds a (V, C) product
#: to the weight's gradient, so fewer, larger chunks are faster (2 cores, V = 32000, 1100 scored rows: 131-row chunks
#: 0.72 s, 524-row chunks 0.59 s, one chunk 0.51 s), while 64 MiB keeps the transient logits small next to the
#: activations
LOSS_CHUNK_BYTES_CPU = 64 * 2**20
#: the same when the output layer is frozen (LoRA): without a weight gradient the chunk size barely matters for speed
#: (131 to 2048 rows: 0.31-0.34 s), so chunks stay small (the CPU default of :func:`lightning_llm.ops.chunk_rows`, the
#: fastest for the log-softmax alone); it is memory LoRA is used to save
LOSS_CHUNK_BYTES_FROZEN_CPU = 8 * 2**20

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

    @classmethod
    def _training_inputs(cls, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """:meth:`_model_inputs` without the attention mask when every row is right-padded (its ones, then zeros) and
        nothing else (packing, explicit positions) needs it: under causal attention a real token never sees the pads
        after it, and its position (the mask's cumulative sum) is its index, so the scored tokens get the same values.
        The attention then runs as plain causal (no ``(B, 1, T, T)`` mask built and stored by every layer for the
        backward, and SDPA's causal kernel); the outputs at pad positions change, but nothing reads them."""
        inputs = cls._model_inputs(batch)
        mask = inputs.get("attention_mask")
        if mask is not None and len(inputs) == 1 and mask.dim() == 2:
            right_padded = mask.shape[1] < 2 or bool((mask[:, 1:] <= mask[:, :-1]).all())
            if right_padded:
                return {}
        return inputs

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the scored targets.

        Only the scored positions go through the output layer (the hidden states of the others are dropped before
        it), in chunks (:data:`LOSS_CHUNK_BYTES_CPU`, :data:`LOSS_CHUNK_BYTES_FROZEN_CPU`), so no ``(B, T, V)`` logits
        exist, in any dtype. A sharded or pipelined model (FSDP2, tensor or pipeline parallel) keeps the model's own
        chunked loss over every position.
        """
        model = self._ensure_model()
        input_ids, targets = batch["input_ids"], batch["targets"]
        weight = model.output_weight
        if self._device_mesh is not None or self._pipeline() is not None or not is_plain(weight):
            return model(input_ids, targets=targets, **self._model_inputs(batch))
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(targets.shape)}."
            )
        hidden = model(input_ids, return_hidden=True, **self._training_inputs(batch))  # (B, T, C)
        flat = targets.flatten()  # (B*T,)
        scored = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
        vocab = model.config.vocab_size
        chunk_bytes = None  # accelerators: the default of lightning_llm.ops.chunk_rows
        if weight.device.type == "cpu":
            chunk_bytes = LOSS_CHUNK_BYTES_CPU if weight.requires_grad else LOSS_CHUNK_BYTES_FROZEN_CPU
        rows = chunk_rows(vocab, weight.device, chunk_bytes)
        bias = model.lm_head.bias if model.lm_head is not None else None
        return chunked_cross_entropy(
            hidden.flatten(0, 1).index_select(0, scored),  # (N, C)
            weight,
            flat.index_select(0, scored),
            bias,
            chunk_size=rows,
            vocab_size=vocab,
        )

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
