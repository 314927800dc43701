"""``CausalLM``: thin Lightning glue around a :class:`~lightning_llm.nn.Transformer` or a Hugging Face causal LM.

Batches are dicts from the data modules: ``input_ids`` ``(B, T)``, ``targets`` ``(B, T)`` (the next token at each
position, ``-100`` where not scored) and optionally ``attention_mask``.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_llm.config import TransformerConfig
from lightning_llm.metrics import LambadaAccuracy, Perplexity
from lightning_llm.nn.transformer import Transformer

IGNORE_INDEX = -100

# checkpoints store the config dataclass in `hyper_parameters`; allow it under torch.load(weights_only=True) (resume)
torch.serialization.add_safe_globals([TransformerConfig])


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """Multiplier for ``LambdaLR``: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class CausalLM(L.LightningModule):
    """Train, evaluate and sample from a causal language model.

    Args:
        config: architecture of a model built here (ignored when ``pretrained`` is given).
        pretrained: a local path (or hub name, when online) of a Hugging Face causal LM to train or evaluate instead.
        convert_pretrained: convert the Hugging Face model into our :class:`Transformer` (faster, KV cache, sharding
            presets) instead of running the Hugging Face module as is.
        vocab_size: overrides ``config.vocab_size``; the CLI links it to the data module's tokenizer.
        learning_rate, weight_decay, betas: AdamW settings (used when ``optimizer`` is not given). Weight decay is applied
            to matrices only, never to norms, biases or embeddings' bias-like vectors.
        warmup_steps, min_lr_ratio: linear warmup then cosine decay to ``min_lr_ratio * lr`` over the run
            (``trainer.estimated_stepping_batches``), used when ``scheduler`` is not given.
        optimizer, scheduler: callables from the CLI (``class_path`` of any torch optimizer / scheduler) that replace the
            defaults.
        eval_task: ``"perplexity"`` for text, ``"lambada"`` to score LAMBADA batches (``test/lambada_acc``,
            ``test/lambada_ppl``).
        generation: keyword arguments of :func:`lightning_llm.nn.generate` used by ``predict_step``.
        compile: wrap the model in ``torch.compile`` (single device; the FSDP2 presets compile per block instead).
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        pretrained: str | None = None,
        convert_pretrained: bool = False,
        vocab_size: int | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        eval_task: Literal["perplexity", "lambada"] = "perplexity",
        generation: dict[str, Any] | None = None,
        compile: bool = False,
        parallel: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if config is None and pretrained is None:
            config = TransformerConfig()
        if config is not None and vocab_size is not None and vocab_size != config.vocab_size:
            config = TransformerConfig.from_dict(
                {**config.to_dict(), "vocab_size": vocab_size, "padded_vocab_size": None}
            )
        self.config = config
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.is_hf = pretrained is not None and not convert_pretrained
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_lambada = LambadaAccuracy(ignore_index=IGNORE_INDEX) if eval_task == "lambada" else None
        self._last_step_time: float | None = None

    # -------------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build the model (idempotent). Under a sharding strategy this runs inside its init context (meta device)."""
        if self.model is not None:
            return
        hp = self.hparams
        if hp.pretrained is not None:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(hp.pretrained, torch_dtype=torch.float32)
            if hp.convert_pretrained:
                from lightning_llm.hf import from_hf

                self.model = from_hf(hf_model)
                self.config = self.model.config
            else:
                self.model = hf_model
            if hp.vocab_size is not None and hp.vocab_size > self.vocab_size:
                raise ValueError(
                    f"The tokenizer has {hp.vocab_size} tokens but the pretrained model {hp.pretrained!r} only "
                    f"{self.vocab_size}; use the model's own tokenizer (data tokenizer={hp.pretrained!r})."
                )
        else:
            self.model = Transformer(self.config)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 / tensor parallel
            from lightning_llm.strategies import parallelize

            strategy = self._trainer.strategy if self._trainer is not None else None
            options = {**getattr(strategy, "parallelize_kwargs", {}), **(hp.parallel or {})}  # module's win
            parallelize(self.model, self.device_mesh, **options)
        elif hp.compile:
            self.model = torch.compile(self.model)

    @property
    def vocab_size(self) -> int:
        if self.is_hf:
            return self.model.config.vocab_size
        return self.config.vocab_size

    def _ensure_model(self) -> torch.nn.Module:
        if self.model is None:
            self.configure_model()
        return self.model

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.tokenizer = tokenizer
            n = getattr(tokenizer, "vocab_size", None)
            if n is not None and not self.is_hf and n > self.config.vocab_size:
                raise ValueError(
                    f"Tokenizer/model vocabulary mismatch: the tokenizer has {n} tokens but the model's vocab_size is "
                    f"{self.config.vocab_size}. Set model vocab_size={n} (the CLI links it from data.vocab_size)."
                )

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)``."""
        model = self._ensure_model()
        if self.is_hf:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        return model(input_ids, attention_mask=attention_mask)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over scored targets, without a full float32 copy of the logits."""
        model = self._ensure_model()
        if self.is_hf:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
            return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
        return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), targets=batch["targets"])

    # -------------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ppl", torch.exp(loss.detach()), batch_size=bs)
        now = time.perf_counter()
        if self._last_step_time is not None:
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / max(now - self._last_step_time, 1e-9), batch_size=bs)
        self._last_step_time = now
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def target_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at only the positions where some row of ``batch["targets"]`` holds a target, and those targets.

        Returns ``(logits (B, P, V), targets (B, P))``, P = positions with a target in any row. The output head runs
        on P positions instead of T (LAMBADA: a few instead of ~100, and the head dominates a small model's cost);
        every target's logits are those of the full forward. Falls back to the full logits for a sharded or compiled
        model, or a Hugging Face model without ``logits_to_keep``.
        """
        input_ids, mask, targets = batch["input_ids"], batch.get("attention_mask"), batch["targets"]
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (P,)
        model = self._ensure_model()
        if self.is_hf:
            if "logits_to_keep" in inspect.signature(model.forward).parameters:
                return model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits, targets[:, keep]
        elif isinstance(model, Transformer) and not hasattr(model.output_weight, "device_mesh"):
            hidden = model(input_ids, attention_mask=mask, return_hidden=True)[:, keep]  # (B, P, C)
            return model.logits(hidden), targets[:, keep]  # (B, P, V)
        return self(input_ids, mask)[:, keep], targets[:, keep]

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        if stage == "test" and self.test_lambada is not None:
            self.test_lambada.update(*self.target_logits(batch))
            return
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        targets = batch["targets"]
        bs = targets.shape[0]
        metric = self.val_ppl if stage == "val" else self.test_ppl
        metric.update(logits, targets)
        self.log(f"{stage}/ppl", metric, prog_bar=stage == "val", batch_size=bs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
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
        if self.is_hf:
            raise NotImplementedError("predict with an unconverted Hugging Face model: set convert_pretrained=true.")
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

    # -------------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_fn is not None:
            optimizer = self.optimizer_fn(params)
        else:
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            groups = [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        if self.scheduler_fn is not None:
            scheduler = self.scheduler_fn(optimizer)
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
            warmup = min(hp.warmup_steps, max(0, total // 2))
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, warmup_cosine_lambda(warmup, total, hp.min_lr_ratio)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what is needed to rebuild model and tokenizer: the config dict, the tokenizer's JSON and special ids."""
        if self.config is not None:
            checkpoint["transformer_config"] = self.config.to_dict()
        if self.tokenizer is not None and hasattr(self.tokenizer, "to_str"):
            checkpoint["tokenizer_json"] = self.tokenizer.to_str()
            checkpoint["tokenizer_special_ids"] = dict(self.tokenizer.special_ids)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer_json" in checkpoint and self.tokenizer is None:
            from lightning_llm.data.tokenizer import Tokenizer

            special = checkpoint.get("tokenizer_special_ids", {})
            self.tokenizer = Tokenizer.from_str(checkpoint["tokenizer_json"], **special)
