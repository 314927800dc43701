"""``PPO``: RLHF with proximal policy optimisation, as the "N implementation details" line of work defines it.

One ``training_step`` = one PPO iteration on a batch of prompts (manual optimisation):

1. **Rollout** (no gradient): batched KV-cache sampling from the policy (:func:`lightning_llm.nn.generate`:
   temperature, top-k / top-p, max new tokens, stop at EOS).
2. **Score**: a reward model checkpoint (:class:`~lightning_llm.modules.RewardModel`, scored at the last real token)
   and/or Python reward functions with TRL's signature ``fn(prompts, completions, **kwargs) -> list[float]``
   (weighted sum); ``missing_eos_penalty`` is subtracted from completions that did not emit EOS.
3. **Experience**: the policy, value model and frozen reference rescore the sampled tokens with the SAME temperature
   as sampling (otherwise the log-probabilities are not the behaviour policy's and KL estimates go negative);
   per-token rewards ``-kl_coef * KL_t`` plus the score at the last response token
   (:func:`lightning_llm.rlhf.kl_penalized_rewards`); GAE advantages and TD(lambda) returns
   (:func:`lightning_llm.rlhf.gae`); advantages whitened over valid tokens.
4. **Update**: ``ppo_epochs`` passes over the rollout, each split into ``num_minibatches`` shuffled minibatches, each
   minibatch accumulated over ``gradient_accumulation_steps`` micro-batches, gradients clipped to
   ``max_grad_norm``, one optimiser step per minibatch; clipped policy loss + ``vf_coef`` * clipped value loss
   (- ``entropy_coef`` * entropy).
5. **KL control**: the fixed or adaptive (Ziegler et al.) controller is updated with the measured KL per sequence
   (averaged over all processes, so every rank keeps the same coefficient).

Alignment: for a sequence ``s`` of P (left-padded) prompt tokens followed by N response tokens, the logits at
positions ``P-1 .. P+N-2`` score the response tokens ``s[P:]``, and the value at position ``P-1+t`` is the value of
the state before response token t. All statistics are averaged over valid response tokens only.

Under DDP, Lightning prepares the gradient all-reduce before every ``manual_backward``, so the many backward passes
of one PPO iteration stay synchronised; each rank samples its own prompts. Every trainable parameter gets a gradient
in every backward (the policy and value losses are one sum, and a separate value model's unused ``lm_head`` is frozen:
:func:`~lightning_llm.modules.reward_model.freeze_lm_head`), so the DDP presets' ``find_unused_parameters=False``
works. Under FSDP2 the policy, value model, reference and reward model are all sharded
(:class:`~lightning_llm.modules.online.OnlineRLModule`); under tensor parallelism (``cpu_fsdp2_tp``) every transformer
is split by heads and the two ranks of a tensor-parallel group sample the same tokens (one data-parallel rank).

Notation: B prompts per rollout, P padded prompt length, N new tokens, V vocabulary, C width.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.modules.base import frozen_copy
from lightning_llm.modules.online import OnlineRLModule, positive_int
from lightning_llm.modules.reward_model import freeze_lm_head
from lightning_llm.nn.generation import GenerationOutput
from lightning_llm.nn.heads import ScalarHead
from lightning_llm.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_entropy,
    masked_mean,
    masked_whiten,
    policy_loss,
    sequence_logprobs,
    value_loss,
)
from lightning_llm.rlhf.rollout import Rollout

__all__ = ["PPO"]


class PPO(OnlineRLModule):
    """RLHF-PPO of a causal LM against a reward model and/or reward functions (see the module docstring).

    Args:
        value_model: ``"head"`` (a scalar head on the policy trunk) or ``"separate"`` (its own transformer, initialised
            from the reward model when given, else from the policy); default: separate when a reward model is given.
        missing_eos_penalty: subtracted from the score of completions that did not emit EOS (TRL's option).
        ppo_epochs: passes over each rollout (see the module docstring).
        clip_eps, value_clip_eps, vf_coef, entropy_coef: loss settings (defaults of TRL's former PPOTrainer).
        gamma, lam: GAE discount and lambda. whiten_advantages: whiten advantages over valid tokens.
        kl_coef, kl_estimator: KL penalty coefficient and estimator (``"k1" | "k2" | "k3"``).
        adaptive_kl, kl_target, kl_horizon: use the adaptive controller (target in nats per sequence).
        **kwargs: the arguments of :class:`~lightning_llm.modules.online.OnlineRLModule`: ``reward_model``,
            ``reward_functions``, ``reward_weights`` (the reward model has weight 1), sampling (``max_new_tokens``,
            ``temperature`` > 0, ``top_k``, ``top_p``), ``num_minibatches``, ``gradient_accumulation_steps``,
            ``max_grad_norm``, completion logging, ``seed``; and those of
            :class:`~lightning_llm.modules.base.LLMModule`: ``config`` or ``pretrained`` of the policy (e.g. the SFT
            model), the optimiser (AdamW with a constant lr 1e-4, no weight decay, by default), ``compile``, ...
    """

    reward_key: ClassVar[str] = "reward_mean"
    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-4, "weight_decay": 0.0, "warmup_steps": 0}

    def __init__(
        self,
        config: TransformerConfig | None = None,
        value_model: Literal["head", "separate"] | None = None,
        missing_eos_penalty: float | None = None,
        ppo_epochs: int = 4,
        clip_eps: float = 0.2,
        value_clip_eps: float | None = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k2", "k3"] = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: float = 10000,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        positive_int("PPO", "ppo_epochs", ppo_epochs)
        if value_model is None:
            value_model = "separate" if self.hparams.reward_model is not None else "head"
        if value_model not in ("head", "separate"):
            raise ValueError(f"PPO: `value_model` must be 'head' or 'separate', got {value_model!r}.")
        self.value_model_kind = value_model
        self.kl_ctl = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl else FixedKLController(kl_coef)
        )
        self.val_kl = MeanMetric()
        self.configure_model()  # eager: the models exist from construction

    def build(self) -> None:
        """Policy, its frozen reference, the frozen reward model (when given) and the value model (head or model)."""
        super().build()
        self.value_backbone = None
        if self.value_model_kind == "separate" and self.reward_model is not None:
            self.value_backbone = frozen_copy(self.reward_model.backbone, trainable=True)
            self.value_head = frozen_copy(self.reward_model.head, trainable=True)
        elif self.value_model_kind == "separate":
            self.value_backbone = frozen_copy(self.policy, trainable=True)
            self.value_head = ScalarHead(self.config.n_embd)
        else:
            self.value_head = ScalarHead(self.config.n_embd)
        if self.value_backbone is not None:  # values come from the head: its LM head would get no gradient (DDP)
            freeze_lm_head(self.value_backbone)

    def transformers(self) -> list[torch.nn.Module]:
        models = [self.policy, self.ref, self.value_backbone]
        models.append(self.reward_model.backbone if self.reward_model is not None else None)
        return [m for m in models if m is not None]

    def heads(self) -> list[torch.nn.Module]:
        """The value head (trainable) and the frozen reward model's head: sharded under FSDP2."""
        return [self.value_head, *super().heads()]

    # -------------------------------------------------------------------------------------------- forward passes
    def policy_and_values(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Response logits ``(B, N, V)`` and values ``(B, N)`` (the state before each response token)."""
        p = prompt_length
        hidden = self.policy(sequences, attention_mask=attention_mask, return_hidden=True)  # (B, P+N, C)
        logits = self.policy.logits(hidden[:, p - 1 : -1])  # (B, N, V)
        if self.value_backbone is not None:
            hidden = self.value_backbone(sequences, attention_mask=attention_mask, return_hidden=True)  # (B, P+N, C)
        values = self.value_head(hidden[:, p - 1 : -1]).float()  # (B, N)
        return logits, values

    @torch.no_grad()
    def reference_logprobs(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, response_mask: torch.Tensor
    ) -> torch.Tensor:
        logits = self.ref(sequences, attention_mask=attention_mask)[:, prompt_length - 1 : -1]  # (B, N, V)
        return sequence_logprobs(logits, sequences[:, prompt_length:], response_mask, self.hparams.temperature)

    # -------------------------------------------------------------------------------------------- rollout
    def experience(
        self,
        out: GenerationOutput,
        rmask: torch.Tensor,
        prompts: list[str],
        completions: list[str],
        raw: torch.Tensor,
        per_function: torch.Tensor,
    ) -> Rollout:
        """Scores (after the missing-EOS penalty), log-probabilities, values, KL-penalised rewards, GAE advantages
        and returns of the sampled responses."""
        hp = self.hparams
        seq, attn, p = out.sequences, out.attention_mask, out.prompt_length
        responses = seq[:, p:]
        scores = raw.clone()
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~out.finished).float()
        logits, values = self.policy_and_values(seq, attn, p)
        logp = sequence_logprobs(logits, responses, rmask, hp.temperature)
        entropy = masked_entropy(logits, rmask, hp.temperature)
        ref_logp = self.reference_logprobs(seq, attn, p, rmask)
        rewards, kl = kl_penalized_rewards(scores, logp, ref_logp, rmask, self.kl_ctl.value, hp.kl_estimator)
        advantages, returns = gae(rewards, values, rmask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages and int(rmask.sum()) >= 2:
            advantages = masked_whiten(advantages, rmask)
        if not (torch.isfinite(returns[rmask]).all() and torch.isfinite(advantages[rmask]).all()):
            raise ValueError(
                f"PPO: rewards of [{scores.min().item():.4g}, {scores.max().item():.4g}] give non-finite returns or "
                "advantages (float32 overflow). Rescale the reward functions / reward model to a range of a few "
                "units, or clip the rewards; training on would only corrupt the weights."
            )
        return Rollout(
            sequences=seq,
            attention_mask=attn,
            prompt_length=p,
            response_mask=rmask,
            logprobs=logp,
            ref_logprobs=ref_logp,
            values=values,
            scores=scores,
            raw_scores=raw,
            rewards=rewards,
            kl=kl,
            advantages=advantages,
            returns=returns,
            entropy=entropy,
            prompts=prompts,
            completions=completions,
            finished=out.finished,
        )

    # -------------------------------------------------------------------------------------------- losses
    def ppo_losses(self, batch: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PPO objective on (a slice of) a rollout under the current weights, with its statistics."""
        hp = self.hparams
        logits, values = self.policy_and_values(batch.sequences, batch.attention_mask, batch.prompt_length)
        logp = sequence_logprobs(logits, batch.responses, batch.response_mask, hp.temperature)
        pg_loss, pg_stats = policy_loss(logp, batch.logprobs, batch.advantages, batch.response_mask, hp.clip_eps)
        vf_loss, vf_clipfrac = value_loss(values, batch.values, batch.returns, batch.response_mask, hp.value_clip_eps)
        loss = pg_loss + hp.vf_coef * vf_loss
        if hp.entropy_coef:
            entropy = masked_entropy(logits, batch.response_mask, hp.temperature)
            loss = loss - hp.entropy_coef * entropy
        stats = {
            "policy_loss": pg_loss.detach(),
            "value_loss": vf_loss.detach(),
            "clipfrac": pg_stats["clipfrac"],
            "approx_kl": pg_stats["approx_kl"],
            "ratio_mean": pg_stats["ratio_mean"],
            "value_clipfrac": vf_clipfrac.detach(),
        }
        return loss, stats

    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """``ppo_epochs`` x ``num_minibatches`` optimiser steps on one rollout; returns the mean statistics."""

        def step(part: Rollout, n_micro: int) -> dict[str, torch.Tensor]:
            loss, stats = self.ppo_losses(part)
            if not torch.isfinite(loss):
                raise ValueError(
                    f"PPO: the loss is {loss.item()} (policy loss {stats['policy_loss'].item()}, value loss "
                    f"{stats['value_loss'].item()}) at rollout {self.rollouts_done}; scores ranged "
                    f"[{rollout.scores.min().item():.4g}, {rollout.scores.max().item():.4g}]. Rescale the "
                    "reward functions / reward model to a range of a few units, lower the learning rate, or "
                    "clip the rewards; training on would only corrupt the weights."
                )
            self.manual_backward(loss / n_micro)
            return stats

        return self.optimise(rollout, self.hparams.ppo_epochs, step)

    # -------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch["prompt"], batch["prompt_ids"])
        kl_coef = self.kl_ctl.value
        stats = self.ppo_update(roll)
        mask = roll.response_mask
        kl_seq = roll.kl.sum(1)  # (B,) per-sequence KL
        mean_kl = self.trainer.strategy.reduce(kl_seq.mean().detach(), reduce_op="mean")
        self.kl_ctl.update(mean_kl, n_steps=len(roll) * self.trainer.world_size)
        logs = {
            "reward_mean": roll.raw_scores.mean(),
            "reward_std": roll.raw_scores.std() if len(roll) > 1 else torch.zeros(()),
            "score_mean": roll.scores.mean(),
            "rlhf_reward": (roll.scores - kl_coef * kl_seq).mean(),
            "kl": kl_seq.mean(),
            "kl_coef": torch.tensor(kl_coef),
            "entropy": roll.entropy,
            "value_explained_variance": torch.nan_to_num(explained_variance(roll.values, roll.returns, mask)),
            "advantage_mean": masked_mean(roll.advantages, mask),
            "return_mean": masked_mean(roll.returns, mask),
            "response_length": mask.float().sum(1).mean(),
            "eos_fraction": roll.finished.float().mean(),
            **{k: torch.tensor(v) for k, v in stats.items()},
        }
        self.log_rollout(roll, logs)

    def validation_metrics(self, roll: Rollout) -> dict[str, tuple[MeanMetric, torch.Tensor]]:
        return {"reward_mean": (self.val_reward, roll.raw_scores.mean()), "kl": (self.val_kl, roll.kl.sum(1).mean())}

    def completion_columns(self, roll: Rollout) -> dict[str, torch.Tensor]:
        return {"score": roll.raw_scores}

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights (policy, value, reference, reward model) and the optimiser are saved by Lightning; add the KL
        controller, then the rollout counter, config, tokenizer and sampler state (:class:`OnlineRLModule`)."""
        checkpoint["kl_controller"] = {"type": type(self.kl_ctl).__name__, **self.kl_ctl.state_dict()}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = dict(checkpoint.get("kl_controller") or {})
        kind = state.pop("type", type(self.kl_ctl).__name__)
        if kind != type(self.kl_ctl).__name__:
            raise ValueError(
                f"PPO: the checkpoint holds a {kind} but this module uses {type(self.kl_ctl).__name__}; resume with "
                f"the same `adaptive_kl` setting."
            )
        if state:
            self.kl_ctl.load_state_dict(state)
        super().on_load_checkpoint(checkpoint)
