"""``CausalLM``: thin Lightning glue around a :class:`~lightning_llm.nn.Transformer` (next-token training, evaluation
and sampling), on the shared :class:`~lightning_llm.modules.base.LLMModule`.

Batches are dicts from the data modules: ``input_ids`` ``(B, T)``, ``targets`` ``(B, T)`` (the next token at each
position, ``-100`` where not scored) and optionally ``attention_mask``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.metrics import LambadaAccuracy, Perplexity
from lightning_llm.modules.base import LLMModule
from lightning_llm.nn.generation import check_sampling
from lightning_llm.nn.transformer import Transformer
from lightning_llm.ops import IGNORE_INDEX, token_logprobs

__all__ = ["CausalLM"]


class CausalLM(LLMModule):
    """Train, evaluate and sample from a causal language model.

    Args:
        eval_task: ``"perplexity"`` for text, ``"lambada"`` to score LAMBADA batches (``test/lambada_acc``,
            ``test/lambada_ppl``).
        generation: keyword arguments of :func:`lightning_llm.nn.generate` used by ``predict_step``.
        **kwargs: the shared arguments of :class:`~lightning_llm.modules.base.LLMModule`: ``config`` or
            ``pretrained`` (a Hugging Face directory or a checkpoint of ours), ``vocab_size``, ``dtype``, the
            optimiser (AdamW, lr 3e-4, weight decay 0.1 on matrices, 100 warmup steps, cosine decay by default),
            ``compile`` and ``parallel``.
    """

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 3e-4, "weight_decay": 0.1, "warmup_steps": 100}

    def __init__(
        self,
        config: TransformerConfig | None = None,
        eval_task: Literal["perplexity", "lambada"] = "perplexity",
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        if eval_task not in ("perplexity", "lambada"):
            raise ValueError(f"CausalLM: `eval_task` must be 'perplexity' or 'lambada', got {eval_task!r}.")
        generation = dict(generation or {})
        check_sampling(**{k: generation[k] for k in ("temperature", "top_k", "top_p") if k in generation})
        self.model: Transformer | None = None
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_lambada = LambadaAccuracy(ignore_index=IGNORE_INDEX) if eval_task == "lambada" else None
        self._last_step_time: float | None = None

    # -------------------------------------------------------------------------------------------------- building
    def build(self) -> None:
        self.model = self.build_backbone()

    def transformers(self) -> list[torch.nn.Module]:
        return [self.model]

    @property
    def vocab_size(self) -> int:
        return self._ensure_model().config.vocab_size

    def _ensure_model(self) -> Transformer:
        if self.model is None:
            self.configure_model()
        return self.model

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)``."""
        return self._ensure_model()(input_ids, attention_mask=attention_mask)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over scored targets, without a full float32 copy of the logits.

        Under pipeline parallelism (:class:`~lightning_llm.parallel.PipelineStrategy`) this runs the schedule's forward
        AND backward and returns the detached loss of the whole batch (the strategy then skips Lightning's backward).
        """
        model = self._ensure_model()
        pipeline = self._pipeline()
        if pipeline is not None:
            _check_no_padding(batch)
            return pipeline.train_step(batch["input_ids"], batch["targets"])
        return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), targets=batch["targets"])

    def _pipeline(self) -> Any:
        """The :class:`~lightning_llm.parallel.PipelineRunner` of a pipeline-split model, else ``None``."""
        return getattr(self.model, "pipeline", None)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Lightning zeroes gradients after ``training_step``; a pipeline step has produced them by then, so the
        gradients are zeroed before the step instead (in :meth:`training_step`)."""
        if self._pipeline() is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    # -------------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._pipeline() is not None and self._trainer is not None:
            for optimizer in self.trainer.optimizers:  # see optimizer_zero_grad
                optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ppl", torch.exp(loss.detach()), batch_size=bs)
        now = time.perf_counter()
        if self._last_step_time is not None:
            sampler = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
            tokens = batch["input_ids"].numel() * sampler.get("num_replicas", self.trainer.world_size)  # data replicas
            self.log("train/tokens_per_sec", tokens / max(now - self._last_step_time, 1e-9), batch_size=bs)
        self._last_step_time = now
        self.log_lr(bs)
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def target_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at only the positions where some row of ``batch["targets"]`` holds a target, and those targets.

        Returns ``(logits (B, P, V), targets (B, P))``, P = positions with a target in any row. The output head runs
        on P positions instead of T (LAMBADA: a few instead of ~100, and the head dominates a small model's cost);
        every target's logits are those of the full forward. Falls back to the full logits for a sharded model.
        """
        input_ids, mask, targets = batch["input_ids"], batch.get("attention_mask"), batch["targets"]
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (P,)
        model = self._ensure_model()
        if hasattr(model.output_weight, "device_mesh"):
            return self(input_ids, mask)[:, keep], targets[:, keep]
        hidden = model(input_ids, attention_mask=mask, return_hidden=True)[:, keep]  # (B, P, C)
        return model.logits(hidden), targets[:, keep]  # (B, P, V)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """Perplexity (a Metric, exact under DDP) and the mean loss, from ONE log-softmax of the logits."""
        if stage == "test" and self.test_lambada is not None:
            self.test_lambada.update(*self.target_logits(batch))
            return
        targets = batch["targets"]
        bs = targets.shape[0]
        mask = targets != IGNORE_INDEX
        pipeline = self._pipeline()
        if pipeline is None:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
            logprobs = token_logprobs(logits, targets, ignore_index=IGNORE_INDEX)  # (B, T) float32, 0 where ignored
        else:  # forward-only through the pipeline: logits exist on the last stage only
            _check_no_padding(batch)
            logits = pipeline.eval_logits(batch["input_ids"])
            if logits is None:  # not the last stage: add nothing to the metric's sums, receive the loss below
                logprobs, mask = torch.zeros(targets.shape, device=targets.device), torch.zeros_like(mask)
            else:
                logprobs = token_logprobs(logits, targets, ignore_index=IGNORE_INDEX)
        metric = self.val_ppl if stage == "val" else self.test_ppl
        metric.update(logprobs=logprobs, mask=mask)  # sum states: synced over all ranks, last stages hold the sums
        self.log(f"{stage}/ppl", metric, prog_bar=stage == "val", batch_size=bs)
        loss = -logprobs.sum() / mask.sum().clamp(min=1)
        if pipeline is not None:
            loss = pipeline.broadcast_from_last(loss)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=bs)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        if self.test_lambada is not None:
            result = self.test_lambada.compute()
            self.log("test/lambada_acc", result["acc"])
            self.log("test/lambada_ppl", result["ppl"])
            self.test_lambada.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """Generate from ``batch["prompt_ids"]`` (lists of token ids) and decode with the data module's tokenizer."""
        kwargs = dict(self.hparams.generation or {})
        if self.tokenizer is not None:
            kwargs.setdefault("eos_id", self.tokenizer.eos_id)
            kwargs.setdefault("pad_id", self.tokenizer.pad_id)
        out = self._ensure_model().generate(batch["prompt_ids"], **kwargs)
        results = []
        for i, prompt in enumerate(batch.get("prompt", [None] * len(batch["prompt_ids"]))):
            tokens = out.responses[i][out.response_mask[i].bool()].tolist()
            text = self.tokenizer.decode(tokens) if self.tokenizer is not None else tokens
            results.append({"prompt": prompt, "completion": text})
        return results


def _check_no_padding(batch: dict[str, torch.Tensor]) -> None:
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "Pipeline parallelism passes only hidden states between stages and does not support padded batches "
            "(an attention_mask with zeros); use packed blocks (TextDataModule) or FSDP2 / DDP for padded data."
        )
