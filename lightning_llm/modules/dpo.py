"""``DPO``: Direct Preference Optimisation (Rafailov et al. 2023) and the loss family of TRL's ``DPOTrainer``.

``loss = -logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))`` with log-probabilities summed over the
completion tokens, or any other TRL 1.16 loss type, a weighted list of them (MPO) and the f-divergence variants
(:func:`lightning_llm.rlhf.dpo_loss`, same names and defaults as ``trl.DPOConfig``). The reference model is a frozen
copy of the initial policy, or a separate model (``ref_model``: a checkpoint of ours or a Hugging Face directory, as
TRL's ``ref_model``) with the policy's tokenizer. Its log-probabilities are computed on the fly, or once for the whole
data set before training (``precompute_ref_logprobs``, TRL's option of the same name) after which the reference is
not run again.

Logged (train/ and val/): ``loss``, ``rewards_chosen`` and ``rewards_rejected`` (the implicit rewards
``beta * (logp - ref_logp)``), ``reward_margin`` (their difference), ``accuracy`` (the preference accuracy: the
fraction of pairs whose chosen implicit reward is the larger), ``logps_chosen`` and ``logps_rejected``.

Notation: B batch of pairs, L padded length, V vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.modules.base import LLMModule, frozen_copy
from lightning_llm.nn.transformer import Transformer
from lightning_llm.rlhf import check_dpo_loss_config, dpo_loss, sequence_logprob_sum

__all__ = ["DPO", "completion_logprobs"]

_METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "accuracy", "logps_chosen", "logps_rejected")


def completion_logprobs(
    model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens, ``(B,)``: ``logits[:, :-1]`` scores ``ids[:, 1:]``."""
    logits = model(input_ids, attention_mask=attention_mask)  # (B, L, V)
    return sequence_logprob_sum(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].bool())


def _check_same_tokenizer(ref: Tokenizer, other: Tokenizer, ref_name: str, other_name: str) -> None:
    """Raise unless the reference's tokenizer has the same vocabulary and special ids as ``other``."""
    same_vocab = ref.backend.get_vocab(with_added_tokens=True) == other.backend.get_vocab(with_added_tokens=True)
    if not same_vocab or (ref.eos_id, ref.bos_id) != (other.eos_id, other.bos_id):
        raise ValueError(
            f"DPO: the reference model {ref_name!r} uses a different tokenizer than the {other_name} "
            f"(reference: {ref!r}; {other_name}: {other!r}); the same ids would mean different text. Pass a reference "
            "trained with the policy's tokenizer, or ref_model=None (a frozen copy of the initial policy)."
        )


class DPO(LLMModule):
    """DPO-family fine-tuning of a causal LM on preference pairs (TRL 1.16's loss types, options and defaults).

    Args:
        beta: the KL strength of the implicit reward (TRL default 0.1).
        loss_type: a loss type of :data:`lightning_llm.rlhf.DPO_LOSS_TYPES` (``"sigmoid"``: DPO, ``"ipo"``,
            ``"hinge"``, ``"robust"``, ``"apo_zero"``, ...) or a list of them, combined with ``loss_weights``.
        loss_weights: one weight per loss type (default 1.0 each), e.g. MPO's ``[0.8, 0.2, 1.0]`` for
            ``["sigmoid", "bco_pair", "sft"]``.
        label_smoothing: the label-flip probability of ``"robust"`` (< 0.5) and the epsilon of ``"exo_pair"``,
            ``"aot"`` and ``"aot_unpaired"``; an error with loss types that ignore it.
        f_divergence_type: ``"reverse_kl"`` (standard DPO), ``"forward_kl"``, ``"js_divergence"`` or
            ``"alpha_divergence"`` (f-DPO; only with the loss types built on the chosen-rejected difference).
        f_alpha_divergence_coef: alpha of ``"alpha_divergence"`` (TRL default 0.5).
        discopop_tau: the temperature of ``"discopop"`` (TRL default 0.05).
        ref_model: a separate reference model: a checkpoint of ours or a Hugging Face directory, read with
            :func:`lightning_llm.loading.load_pretrained`; it must share the policy's tokenizer and vocabulary. Default:
            a frozen copy of the initial policy.
        precompute_ref_logprobs: compute the reference log-probabilities of every train / val pair once at the start
            of fit (needs :class:`~lightning_llm.data.preference.PreferenceDataModule`) instead of on the fly.
        **kwargs: the shared arguments of :class:`~lightning_llm.modules.base.LLMModule`: ``config`` or
            ``pretrained`` of the policy (a Hugging Face directory or a checkpoint of ours, usually the SFT model; the
            default reference is a frozen copy of it), ``vocab_size``, ``dtype``, the optimiser (AdamW, lr 5e-4, no
            weight decay, 10 warmup steps, cosine decay by default), ``compile``, ``parallel``.
    """

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 5e-4, "weight_decay": 0.0, "warmup_steps": 10}

    def __init__(
        self,
        config: TransformerConfig | None = None,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        ref_model: str | None = None,
        precompute_ref_logprobs: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"DPO: `beta` must be a number > 0, got {beta!r}.")
        self._loss_types, self._loss_weights = check_dpo_loss_config(
            loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, "DPO"
        )
        if ref_model is not None and not isinstance(ref_model, (str, os.PathLike)):
            raise TypeError(
                f"DPO: `ref_model` must be None or a path (our checkpoint or a Hugging Face directory), got "
                f"{type(ref_model).__name__}."
            )
        self._ref_tokenizer: Tokenizer | None = None
        self._ref_cache: dict[str, torch.Tensor] = {}
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in _METRICS})
        self.configure_model()  # eager: the policy and the reference exist from construction

    def build(self) -> None:
        self.policy = self.build_backbone()
        ref_model = self.hparams.ref_model
        # no ref_model: under LoRA the policy with adapters disabled (no copy), else a frozen copy of the policy
        self.ref = (
            self.make_reference(self.policy)
            if ref_model is None
            else self._reference(ref_model, self.hparams.pretrained)
        )

    def transformers(self) -> list[torch.nn.Module]:
        return [self.policy, self.ref]

    # -------------------------------------------------------------------------------------------- reference
    def _reference(self, ref_model: str | os.PathLike | None, pretrained: str | None) -> Transformer:
        """The frozen reference: a copy of the initial policy, or ``ref_model`` loaded with ``load_pretrained``."""
        if ref_model is None:
            return frozen_copy(self.policy)
        from lightning_llm.loading import load_pretrained

        dtype = next(self.policy.parameters()).dtype
        ref, ref_tokenizer = load_pretrained(ref_model, dtype=dtype)
        if ref.config.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"DPO: the reference model {str(ref_model)!r} has vocab_size={ref.config.vocab_size} but the policy "
                f"has {self.config.vocab_size}; a reference must share the policy's tokenizer and vocabulary. Pass a "
                "reference trained with the same tokenizer, or ref_model=None (a frozen copy of the initial policy)."
            )
        self._ref_tokenizer = ref_tokenizer
        if pretrained is not None and ref_tokenizer is not None:
            if any((Path(pretrained) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                _check_same_tokenizer(ref_tokenizer, Tokenizer.from_pretrained(pretrained), str(ref_model), "policy")
        ref.eval()
        ref.requires_grad_(False)
        return ref

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
        hp = self.hparams
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta=hp.beta,
            loss_type=self._loss_types,
            loss_weights=self._loss_weights,
            label_smoothing=hp.label_smoothing,
            chosen_lengths=batch["chosen_loss_mask"].sum(1),  # (B,) completion tokens, eos included (TRL's)
            rejected_lengths=batch["rejected_loss_mask"].sum(1),
            f_divergence_type=hp.f_divergence_type,
            f_alpha_divergence_coef=hp.f_alpha_divergence_coef,
            discopop_tau=hp.discopop_tau,
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
        super().setup(stage)
        if self.tokenizer is not None and self._ref_tokenizer is not None:
            _check_same_tokenizer(self._ref_tokenizer, self.tokenizer, str(self.hparams.ref_model), "data module")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]
