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
of one PPO iteration stay synchronised; each rank samples its own prompts.

Notation: B prompts per rollout, P padded prompt length, N new tokens, V vocabulary, C width.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.modules.base import LLMModule, frozen_copy
from lightning_llm.modules.reward_model import RewardModel
from lightning_llm.nn.generation import check_sampling, generate
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
from lightning_llm.rlhf.rewards import resolve_reward_function, weighted_reward_scores
from lightning_llm.rlhf.rollout import Rollout

__all__ = ["PPO"]


class PPO(LLMModule):
    """RLHF-PPO of a causal LM against a reward model and/or reward functions (see the module docstring).

    Args:
        reward_model: path of a :class:`RewardModel` checkpoint; its tokenizer must equal the policy's.
        reward_functions: callables (or import paths / class_path dicts) with TRL's reward-function signature.
        reward_weights: one weight per reward function (default 1.0 each); the reward model has weight 1.
        value_model: ``"head"`` (a scalar head on the policy trunk) or ``"separate"`` (its own transformer, initialised
            from the reward model when given, else from the policy); default: separate when a reward model is given.
        max_new_tokens, temperature, top_k, top_p: rollout sampling (``temperature`` > 0).
        missing_eos_penalty: subtracted from the score of completions that did not emit EOS (TRL's option).
        ppo_epochs, num_minibatches, gradient_accumulation_steps: the update schedule (see the module docstring).
        clip_eps, value_clip_eps, vf_coef, entropy_coef: loss settings (defaults of TRL's former PPOTrainer).
        gamma, lam: GAE discount and lambda. whiten_advantages: whiten advantages over valid tokens.
        kl_coef, kl_estimator: KL penalty coefficient and estimator (``"k1" | "k2" | "k3"``).
        adaptive_kl, kl_target, kl_horizon: use the adaptive controller (target in nats per sequence).
        max_grad_norm: gradient clipping of each optimiser step.
        log_completions_every_n_steps, num_logged_completions: sample completions logged to the logger (when it has
            ``log_text``, e.g. W&B) or to ``<log_dir>/completions.csv``.
        seed: seed of the rollout sampler (offset by the process rank).
        **kwargs: the shared arguments of :class:`~lightning_llm.modules.base.LLMModule`: ``config`` or
            ``pretrained`` of the policy (a Hugging Face directory or a checkpoint of ours, e.g. the SFT model),
            ``vocab_size``, ``dtype``, the optimiser (AdamW with a constant lr 1e-4, no weight decay, by default;
            a ``scheduler`` callable may add a schedule), ``compile``, ``parallel``.
    """

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-4, "weight_decay": 0.0, "warmup_steps": 0}
    hparams_ignore: ClassVar[tuple[str, ...]] = ("reward_functions",)

    def __init__(
        self,
        config: TransformerConfig | None = None,
        reward_model: str | None = None,
        reward_functions: list[Any] | None = None,
        reward_weights: list[float] | None = None,
        value_model: Literal["head", "separate"] | None = None,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        missing_eos_penalty: float | None = None,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
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
        max_grad_norm: float | None = 1.0,
        log_completions_every_n_steps: int = 50,
        num_logged_completions: int = 4,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        self.automatic_optimization = False
        if not temperature > 0:
            raise ValueError(
                f"PPO: `temperature` must be > 0 (PPO needs a stochastic policy and rescoring at the sampling "
                f"temperature), got {temperature}."
            )
        check_sampling(temperature, top_k, top_p)
        for name, value in (
            ("max_new_tokens", max_new_tokens),
            ("ppo_epochs", ppo_epochs),
            ("num_minibatches", num_minibatches),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPO: `{name}` must be a positive integer, got {value!r}.")
        if reward_functions is not None and not isinstance(reward_functions, (list, tuple)):
            reward_functions = [reward_functions]
        self.reward_functions = [resolve_reward_function(f) for f in (reward_functions or [])]
        if reward_model is None and not self.reward_functions:
            raise ValueError("PPO: give a `reward_model` checkpoint path and/or `reward_functions`; got neither.")
        weights = [1.0] * len(self.reward_functions) if reward_weights is None else list(reward_weights)
        if len(weights) != len(self.reward_functions):
            raise ValueError(
                f"PPO: `reward_weights` has {len(weights)} entries for {len(self.reward_functions)} reward functions; "
                "give one weight per function."
            )
        self.reward_weights = weights
        if value_model is None:
            value_model = "separate" if reward_model is not None else "head"
        if value_model not in ("head", "separate"):
            raise ValueError(f"PPO: `value_model` must be 'head' or 'separate', got {value_model!r}.")
        self.value_model_kind = value_model
        self.kl_ctl = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl else FixedKLController(kl_coef)
        )
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self.rollouts_done = 0
        self.val_reward = MeanMetric()
        self.val_kl = MeanMetric()
        self.configure_model()  # eager: the models exist from construction

    def build(self) -> None:
        """Policy, its frozen reference, the frozen reward model (when given) and the value model (head or model)."""
        hp = self.hparams
        self.policy = self.build_backbone()
        self.ref = self.make_reference(self.policy)  # under LoRA: the policy with adapters disabled, no copy
        self.reward_model: RewardModel | None = None
        if hp.reward_model is not None:
            self.reward_model = RewardModel.from_checkpoint(hp.reward_model)
            if self.reward_model.config.vocab_size != self.config.vocab_size:
                raise ValueError(
                    f"PPO: tokenizer mismatch between policy and reward model: the reward model {hp.reward_model!r} "
                    f"has vocab_size {self.reward_model.config.vocab_size}, the policy {self.config.vocab_size}. Train "
                    "the reward model with the same tokenizer as the policy's prompt data."
                )
        self.value_backbone = None
        if self.value_model_kind == "separate" and self.reward_model is not None:
            self.value_backbone = frozen_copy(self.reward_model.backbone, trainable=True)
            self.value_head = frozen_copy(self.reward_model.head, trainable=True)
        elif self.value_model_kind == "separate":
            self.value_backbone = frozen_copy(self.policy, trainable=True)
            self.value_head = ScalarHead(self.config.n_embd)
        else:
            self.value_head = ScalarHead(self.config.n_embd)

    def transformers(self) -> list[torch.nn.Module]:
        models = [self.policy, self.ref, self.value_backbone]
        models.append(self.reward_model.backbone if self.reward_model is not None else None)
        return [m for m in models if m is not None]

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

    # -------------------------------------------------------------------------------------------- rewards
    def compute_scores(
        self,
        prompts: list[str],
        completions: list[str],
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Weighted sum of the reward functions' values plus the reward model's score, ``(B,)`` float32."""
        total, _ = weighted_reward_scores(
            self.reward_functions, self.reward_weights, prompts, completions, owner="PPO", **kwargs
        )
        total = total.to(sequences.device)
        if self.reward_model is not None:
            with torch.no_grad():
                total += self.reward_model(sequences, attention_mask).float()
        return total

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        if self.tokenizer is None:
            return [" ".join(map(str, row[m.bool()].tolist())) for row, m in zip(tokens, mask)]
        return [self.tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(tokens, mask)]

    # -------------------------------------------------------------------------------------------- rollout
    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        if not prompt_ids:
            raise ValueError("PPO: the batch has no prompts.")
        longest = max(len(p) for p in prompt_ids)
        limits = [("policy", self.config.block_size)]
        if self.reward_model is not None:
            limits.append(("reward model", self.reward_model.config.block_size))
        for what, block in limits:
            if longest + self.hparams.max_new_tokens > block:
                raise ValueError(
                    f"PPO: a prompt of {longest} tokens plus max_new_tokens={self.hparams.max_new_tokens} exceeds the "
                    f"{what}'s context (block_size={block}). Shorten or filter the prompts, lower max_new_tokens, or "
                    "use a model with a larger block_size."
                )

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.hparams.seed + 1000 * self.global_rank)
            if self._generator_state is not None:
                g.set_state(self._generator_state)
                self._generator_state = None
            self._generator = g
        return self._generator

    @torch.no_grad()
    def rollout(self, prompts: list[str], prompt_ids: list[list[int]], temperature: float | None = None) -> Rollout:
        """Sample completions, score them and build the experience (rewards, advantages, returns)."""
        hp = self.hparams
        self._check_prompts(prompt_ids)
        eos_id = self.tokenizer.eos_id if self.tokenizer is not None else None
        pad_id = self.tokenizer.pad_id if self.tokenizer is not None else 0
        temperature = hp.temperature if temperature is None else temperature
        was_training = self.training
        self.eval()
        out = generate(
            self.policy,
            prompt_ids,
            max_new_tokens=hp.max_new_tokens,
            temperature=temperature,
            top_k=hp.top_k,
            top_p=hp.top_p,
            eos_id=eos_id,
            pad_id=pad_id,
            generator=self.generator,
        )
        seq, attn, p = out.sequences, out.attention_mask, out.prompt_length
        rmask = out.response_mask.bool()
        responses = seq[:, p:]
        completions = self._decode(responses, rmask)
        raw = self.compute_scores(list(prompts), completions, seq, attn)
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
        self.train(was_training)
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
            finished=out.finished,
            entropy=entropy,
            prompts=list(prompts),
            completions=completions,
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
        hp = self.hparams
        opt = self.optimizers()
        b = len(rollout)
        n_mb = min(hp.num_minibatches, b)
        sums: dict[str, float] = {}
        count = 0
        self.train()
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(b, generator=self.generator, device=self.device)
            for mb in order.tensor_split(n_mb):
                micro = [m for m in mb.tensor_split(min(hp.gradient_accumulation_steps, len(mb))) if len(m)]
                for idx in micro:
                    loss, stats = self.ppo_losses(rollout.select(idx))
                    if not torch.isfinite(loss):
                        raise ValueError(
                            f"PPO: the loss is {loss.item()} (policy loss {stats['policy_loss'].item()}, value loss "
                            f"{stats['value_loss'].item()}) at rollout {self.rollouts_done}; scores ranged "
                            f"[{rollout.scores.min().item():.4g}, {rollout.scores.max().item():.4g}]. Rescale the "
                            "reward functions / reward model to a range of a few units, lower the learning rate, or "
                            "clip the rewards; training on would only corrupt the weights."
                        )
                    self.manual_backward(loss / len(micro))
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                if hp.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad(set_to_none=True)
        return {k: v / max(count, 1) for k, v in sums.items()}

    # -------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        roll = self.rollout(batch["prompt"], batch["prompt_ids"])
        kl_coef = self.kl_ctl.value
        stats = self.ppo_update(roll)
        mask = roll.response_mask
        kl_seq = roll.kl.sum(1)  # (B,) per-sequence KL
        mean_kl = self.trainer.strategy.reduce(kl_seq.mean().detach(), reduce_op="mean")
        self.kl_ctl.update(mean_kl, n_steps=len(roll) * self.trainer.world_size)
        self.rollouts_done += 1
        bs = len(roll)
        logs = {
            "reward_mean": roll.raw_scores.mean(),
            "reward_std": roll.raw_scores.std() if bs > 1 else torch.zeros(()),
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
        for k, v in logs.items():
            self.log(
                f"train/{k}",
                v.float().to(self.device),
                prog_bar=k in ("reward_mean", "kl"),
                batch_size=bs,
                sync_dist=True,
                on_step=True,
                on_epoch=False,
            )
        self.log("train/rollout", float(self.rollouts_done), batch_size=bs, on_step=True, on_epoch=False)
        every = hp.log_completions_every_n_steps
        if every and (self.rollouts_done == 1 or self.rollouts_done % every == 0):
            self.log_completions(roll)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch["prompt"], batch["prompt_ids"])
        bs = len(roll)
        self.val_reward.update(roll.raw_scores.mean(), weight=bs)
        self.val_kl.update(roll.kl.sum(1).mean(), weight=bs)
        self.log("val/reward_mean", self.val_reward, prog_bar=True, batch_size=bs)
        self.log("val/kl", self.val_kl, batch_size=bs)

    # -------------------------------------------------------------------------------------------- sample completions
    def log_completions(self, roll: Rollout) -> None:
        """Log a few (prompt, completion, score) rows: ``logger.log_text`` when available, else a CSV in the log dir."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        n = min(self.hparams.num_logged_completions, len(roll))
        rows = [[self.rollouts_done, roll.prompts[i], roll.completions[i], float(roll.raw_scores[i])] for i in range(n)]
        columns = ["rollout", "prompt", "completion", "score"]
        logger = self.logger
        if logger is not None and hasattr(logger, "log_text"):
            logger.log_text(key="samples/completions", columns=columns, data=rows, step=self.global_step)
            return
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if log_dir is None:
            return
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "completions.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(columns)
            writer.writerows(rows)

    # -------------------------------------------------------------------------------------------- setup / optim
    def setup(self, stage: str) -> None:
        super().setup(stage)
        tokenizer = self.tokenizer
        rm_tok = self.reward_model.tokenizer if self.reward_model is not None else None
        if tokenizer is not None and rm_tok is not None and rm_tok.fingerprint != tokenizer.fingerprint:
            raise ValueError(
                f"PPO: tokenizer mismatch between policy and reward model: the prompt data uses {tokenizer!r}, the "
                f"reward model {self.hparams.reward_model!r} was trained with {rm_tok!r}. The reward model scores the "
                "policy's token ids, so both must use the same tokenizer: retrain the reward model on data tokenized "
                "like the prompts, or set the prompt data's `tokenizer` to the reward model's."
            )

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable parameters; a constant learning rate unless a ``scheduler`` callable is given
        (manual optimisation: PPO steps the optimiser itself, ``ppo_epochs x num_minibatches`` times per rollout)."""
        optimizer = self.make_optimizer(self.trainable_parameters())
        if self.scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer), "interval": "step"}}

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights (policy, value, reference, reward model) and the optimiser are saved by Lightning; add the KL
        controller, the sampler's RNG state, the rollout counter, the config and the tokenizer."""
        checkpoint["kl_controller"] = {"type": type(self.kl_ctl).__name__, **self.kl_ctl.state_dict()}
        checkpoint["rollouts_done"] = self.rollouts_done
        super().on_save_checkpoint(checkpoint)
        if self._generator is not None:
            checkpoint["generator_state"] = self._generator.get_state()

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
        self.rollouts_done = int(checkpoint.get("rollouts_done", 0))
        super().on_load_checkpoint(checkpoint)
        if "generator_state" in checkpoint:
            self._generator_state = checkpoint["generator_state"]
            self._generator = None
