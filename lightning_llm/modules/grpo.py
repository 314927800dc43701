"""``GRPO`` and ``RLOO``: critic-free online RL of a causal LM, as TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer`` define it.

One ``training_step`` = one generation batch (manual optimisation):

1. **Generate** (no gradient): each of the B prompts of the batch is repeated G times (``num_generations``, TRL's
   ``repeat_interleave`` layout) and sampled with the KV cache (:func:`lightning_llm.nn.generate`).
2. **Score**: reward functions with TRL's signature ``fn(prompts, completions, **kwargs) -> list[float]`` (weighted
   sum, ``reward_weights``) and/or a :class:`~lightning_llm.modules.RewardModel` checkpoint (weight 1, the same
   tokenizer as the policy). A function returning the wrong number of values or a non-finite value is an error.
3. **Advantages**: GRPO: ``A_i = (r_i - mean_group r) / (std r + 1e-4)`` with ``scale_rewards`` ``"group"`` (the
   group's std), ``"batch"`` (the batch's) or ``"none"`` (Dr. GRPO)
   (:func:`lightning_llm.rlhf.group_relative_advantages`). RLOO: the reward first loses ``beta * KL_seq`` (k1 summed
   over the completion, from the sampling policy and the reference), then ``A_i = r_i - mean_{j != i} r_j``
   (:func:`lightning_llm.rlhf.rloo_advantages`), optionally whitened over the batch (``normalize_advantages``).
4. **Update**: ``num_iterations`` passes over the generation batch (TRL's mu), each split into ``num_minibatches``
   shuffled optimiser steps (TRL's ``steps_per_generation``), each accumulated over ``gradient_accumulation_steps``
   micro-batches, gradients clipped to ``max_grad_norm``. GRPO: the per-token clipped ratio objective plus
   ``beta * KL_k3`` to the reference, aggregated by ``loss_type`` (:func:`lightning_llm.rlhf.grpo_loss`; ``dapo``
   divides by the active tokens of the whole generation batch, averaged over processes, as TRL). RLOO: the
   sequence-level clipped ratio (:func:`lightning_llm.rlhf.policy_loss` with ``level="sequence"``).

``beta == 0`` (GRPO's default) builds no reference model. ``mask_truncated_completions`` drops completions that did
not emit EOS from the loss (DAPO). With one update per generation the sampling log-probabilities are not computed
(the ratio is 1 and the loss uses ``logp.detach()``, as TRL).

Logged per step (``train/...``): ``reward`` / ``reward_std`` (weighted total), ``rewards/<function>/mean`` and
``/std``, ``frac_reward_zero_std`` (groups whose rewards are all equal: no learning signal), ``completion_length``
(mean, min, max), ``clipped_ratio`` (fraction truncated), ``entropy``, ``kl`` (when a reference exists),
``clip_ratio/low_mean`` / ``high_mean`` / ``region_mean``, ``loss``.

Notation: B prompts per batch, G completions per prompt, P padded prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.modules.online import OnlineRLModule, positive_int
from lightning_llm.nn.generation import GenerationOutput
from lightning_llm.rlhf import entropy_from_logits, masked_mean, sequence_logprobs
from lightning_llm.rlhf.advantages import (
    SCALE_REWARDS,
    group_relative_advantages,
    rloo_advantages,
    sequence_kl_penalized_scores,
)
from lightning_llm.rlhf.losses import GRPO_LOSS_TYPES, grpo_loss, policy_loss
from lightning_llm.rlhf.rewards import reward_function_name
from lightning_llm.rlhf.rollout import GroupRollout

__all__ = ["GRPO", "RLOO"]


class _GroupRL(OnlineRLModule):
    """Shared machinery of GRPO and RLOO: G completions per prompt, the update loop, the group statistics.

    Subclasses implement :meth:`advantages` and :meth:`loss`.

    Args:
        num_generations: completions per prompt G >= 2.
        beta: KL coefficient (0: no reference model is built).
        epsilon, epsilon_high: clip range of the ratio (``epsilon_high`` defaults to ``epsilon``; DAPO: 0.28).
        mask_truncated_completions: exclude completions without EOS from the loss.
        num_iterations: updates per generation batch (TRL's mu, default 1).
        **kwargs: the arguments of :class:`~lightning_llm.modules.online.OnlineRLModule` (reward model and functions,
            sampling, ``num_minibatches``, ``gradient_accumulation_steps``, ``max_grad_norm`` (TRL's 1.0), completion
            logging, ``seed``) and of :class:`~lightning_llm.modules.base.LLMModule` (``pretrained``, ``dtype``,
            optimiser: AdamW with a constant lr 1e-6 and no weight decay by default, as TRL's ``GRPOConfig``).
    """

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-6, "weight_decay": 0.0, "warmup_steps": 0}

    def __init__(
        self,
        config: TransformerConfig | None = None,
        num_generations: int = 8,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        mask_truncated_completions: bool = False,
        num_iterations: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        owner = self.algorithm
        hint = (
            " Group baselines compare completions of one prompt: each needs 2 or more (TRL's GRPO default 8, RLOO's 2)."
        )
        positive_int(owner, "num_generations", num_generations, 2, hint)
        positive_int(owner, "num_iterations", num_iterations)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"{owner}: `beta` must be a number >= 0 (0: no reference model), got {beta!r}.")
        for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{owner}: `{name}` must be a number > 0, got {value!r}.")
        self.reward_names = [reward_function_name(f) for f in self.reward_functions]
        if self.hparams.reward_model is not None:
            self.reward_names.append("reward_model")
        self.beta, self.epsilon = float(beta), float(epsilon)
        self.epsilon_high = float(epsilon if epsilon_high is None else epsilon_high)
        self.configure_model()  # eager: the models exist from construction

    # -------------------------------------------------------------------------------------------- models
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    # -------------------------------------------------------------------------------------------- forward passes
    def completion_logprobs(
        self,
        model: torch.nn.Module,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        mask: torch.Tensor,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logp (B, N), entropy (B, N) or None)`` of the completion tokens at the sampling temperature."""
        p = prompt_length
        hidden = model(sequences, attention_mask=attention_mask, return_hidden=True)  # (B, P+N, C)
        logits = model.logits(hidden[:, p - 1 : -1])  # (B, N, V)
        temperature = self.hparams.temperature
        logp = sequence_logprobs(logits, sequences[:, p:], mask, temperature)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach(), temperature=temperature, mask=mask)  # (B, N)
        return logp, entropy

    # -------------------------------------------------------------------------------------------- rollout
    def needs_old_logprobs(self) -> bool:
        """Whether the sampling policy's log-probs differ from the current ones at some update (TRL's rule)."""
        return self.hparams.num_iterations > 1 or self.hparams.num_minibatches > 1

    def rollout(
        self, prompts: list[str], prompt_ids: list[list[int]], temperature: float | None = None
    ) -> GroupRollout:
        """Sample G completions per prompt (TRL's ``repeat_interleave`` order), score them, compute the advantages."""
        g = self.hparams.num_generations
        prompts = [p for p in prompts for _ in range(g)]  # (B * G)
        return super().rollout(prompts, [list(p) for p in prompt_ids for _ in range(g)], temperature)

    def experience(
        self,
        out: GenerationOutput,
        cmask: torch.Tensor,
        prompts: list[str],
        completions: list[str],
        rewards: torch.Tensor,
        per_function: torch.Tensor,
    ) -> GroupRollout:
        seq, attn, p = out.sequences, out.attention_mask, out.prompt_length
        lmask = cmask & out.finished[:, None] if self.hparams.mask_truncated_completions else cmask
        old = None
        if self.needs_old_logprobs():
            old, _ = self.completion_logprobs(self.policy, seq, attn, p, cmask)
        ref = None
        if self.ref is not None:
            ref, _ = self.completion_logprobs(self.ref, seq, attn, p, cmask)
        roll = GroupRollout(
            sequences=seq,
            attention_mask=attn,
            prompt_length=p,
            completion_mask=cmask,
            loss_mask=lmask,
            old_logprobs=old,
            ref_logprobs=ref,
            rewards=rewards,
            rewards_per_function=per_function,
            advantages=torch.zeros_like(rewards),
            finished=out.finished,
            prompts=prompts,
            completions=completions,
        )
        roll.advantages = self.advantages(roll)
        return roll

    def advantages(self, roll: GroupRollout) -> torch.Tensor:
        raise NotImplementedError

    def loss(
        self, roll: GroupRollout, logp: torch.Tensor, num_items: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one micro-batch (``logp`` with gradient); subclasses implement it."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- update
    def _num_items(self, roll: GroupRollout) -> torch.Tensor:
        """Active tokens of the whole generation batch, averaged over processes (TRL's ``num_items_in_batch`` /
        ``num_processes``)."""
        n = roll.loss_mask.sum().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="mean")
        return n

    def update(self, roll: GroupRollout) -> dict[str, float]:
        """``num_iterations x num_minibatches`` optimiser steps on one generation batch; returns mean statistics."""
        # TRL's dapo normaliser (num_items / num_processes * accumulation / steps_per_generation): the expected active
        # tokens of one optimiser step, the same for each of its micro-batches
        num_items = self._num_items(roll) / min(self.hparams.num_minibatches, len(roll))

        def step(part: GroupRollout, n_micro: int) -> dict[str, torch.Tensor]:
            logp, entropy = self.completion_logprobs(
                self.policy, part.sequences, part.attention_mask, part.prompt_length, part.completion_mask, True
            )
            loss, stats = self.loss(part, logp, num_items)
            scale = 1.0 if self.accumulates_by_sum() else 1.0 / n_micro
            self.manual_backward(loss * scale)
            stats["entropy"] = masked_mean(entropy, part.completion_mask)
            stats["loss"] = loss.detach()
            return stats

        return self.optimise(roll, self.hparams.num_iterations, step)

    def accumulates_by_sum(self) -> bool:
        """True when each micro-batch's loss is already normalised for the whole optimiser step (``dapo``)."""
        return False

    # -------------------------------------------------------------------------------------------- steps
    def rollout_stats(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        g = self.hparams.num_generations
        lengths = roll.completion_mask.float().sum(1)
        grouped = roll.rewards.view(-1, g)
        std = grouped.std(dim=1)
        stats = {
            "reward": roll.rewards.mean(),
            "reward_std": roll.rewards.std(),
            "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
            "completion_length": lengths.mean(),
            "completion_length_min": lengths.min(),
            "completion_length_max": lengths.max(),
            "clipped_ratio": (~roll.finished).float().mean(),
            "advantage_abs_mean": roll.advantages.abs().mean(),
        }
        for i, name in enumerate(self.reward_names):
            stats[f"rewards/{name}/mean"] = roll.rewards_per_function[:, i].mean()
            stats[f"rewards/{name}/std"] = roll.rewards_per_function[:, i].std()
        return stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch["prompt"], batch["prompt_ids"])
        stats = {k: torch.as_tensor(v) for k, v in self.update(roll).items()}
        logs = {**self.rollout_stats(roll), **stats}
        for rename in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            if rename in logs:
                logs["clip_ratio/" + rename.split("_")[-1] + "_mean"] = logs.pop(rename)
        self.log_rollout(roll, logs)

    def validation_metrics(self, roll: GroupRollout) -> dict[str, tuple[MeanMetric, torch.Tensor]]:
        return {"reward": (self.val_reward, roll.rewards.mean())}

    def completion_columns(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        return {"reward": roll.rewards, "advantage": roll.advantages}


class GRPO(_GroupRL):
    """Group Relative Policy Optimization (Shao et al. 2024) with TRL 1.16's options (see the module docstring).

    Args:
        num_generations: completions per prompt G >= 2 (TRL's 8).
        beta: KL coefficient (TRL's default 0.0: no reference model is built).
        scale_rewards: ``"group"`` (default), ``"batch"`` or ``"none"`` (see the module docstring).
        loss_type: ``"dapo"`` (TRL's default), ``"grpo"``, ``"bnpo"`` or ``"dr_grpo"`` (``max_new_tokens`` is
            ``dr_grpo``'s constant).
        **kwargs: the arguments of :class:`_GroupRL` (``num_iterations``, ``epsilon``, ``epsilon_high``,
            ``mask_truncated_completions``) and of :class:`~lightning_llm.modules.online.OnlineRLModule` (reward model
            and functions, sampling, ``num_minibatches`` (TRL's ``steps_per_generation``), ...).
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        num_generations: int = 8,
        beta: float = 0.0,
        scale_rewards: str = "group",
        loss_type: str = "dapo",
        **kwargs: Any,
    ) -> None:
        scale = ("group" if scale_rewards else "none") if isinstance(scale_rewards, bool) else scale_rewards
        if scale not in SCALE_REWARDS:  # TRL accepts booleans
            raise ValueError(f"GRPO: `scale_rewards` must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}.")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"GRPO: `loss_type` must be one of {list(GRPO_LOSS_TYPES)}, got {loss_type!r}.")
        super().__init__(config=config, num_generations=num_generations, beta=beta, **kwargs)
        self.scale_rewards, self.loss_type = scale, loss_type

    def advantages(self, roll: GroupRollout) -> torch.Tensor:
        return group_relative_advantages(roll.rewards, self.hparams.num_generations, scale_rewards=self.scale_rewards)

    def accumulates_by_sum(self) -> bool:
        return self.loss_type == "dapo"

    def loss(
        self, roll: GroupRollout, logp: torch.Tensor, num_items: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        old = logp.detach() if roll.old_logprobs is None else roll.old_logprobs
        return grpo_loss(
            logp,
            old,
            roll.advantages,
            roll.loss_mask,
            ref_logp=roll.ref_logprobs,
            beta=self.beta,
            clip_eps=self.epsilon,
            clip_eps_high=self.epsilon_high,
            loss_type=self.loss_type,
            max_completion_length=self.hparams.max_new_tokens,
            num_items=num_items,
        )

    def rollout_stats(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        stats = super().rollout_stats(roll)
        if self.scale_rewards == "batch":  # TRL's frac_reward_zero_std uses the std it scales by
            std = roll.rewards.std()
            stats["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float()
        return stats


class RLOO(_GroupRL):
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024) as TRL 1.16's ``RLOOTrainer``.

    The sequence reward loses ``beta * KL_seq`` (k1, summed over the completion) before the leave-one-out baseline;
    the objective is the clipped sequence-level ratio (see the module docstring).

    Args:
        num_generations: completions per prompt G >= 2 (TRL's RLOO default 2).
        beta: KL coefficient in the reward (TRL's RLOO default 0.05; 0: no reference model).
        normalize_advantages: whiten the advantages over the batch (TRL's option, default off).
        **kwargs: the other arguments are :class:`GRPO`'s (those of :class:`_GroupRL` and
            :class:`~lightning_llm.modules.online.OnlineRLModule`).
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        num_generations: int = 2,
        beta: float = 0.05,
        normalize_advantages: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, num_generations=num_generations, beta=beta, **kwargs)
        self.normalize_advantages = bool(normalize_advantages)

    def needs_old_logprobs(self) -> bool:
        return True  # the sequence ratio and the KL in the reward need them (TRL computes them always)

    def advantages(self, roll: GroupRollout) -> torch.Tensor:
        rewards = roll.rewards
        if roll.ref_logprobs is not None:
            rewards, _ = sequence_kl_penalized_scores(
                rewards, roll.old_logprobs, roll.ref_logprobs, roll.loss_mask, self.beta
            )
        adv = rloo_advantages(rewards, self.hparams.num_generations)
        if self.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-4)
        return adv

    def loss(
        self, roll: GroupRollout, logp: torch.Tensor, num_items: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return policy_loss(
            logp,
            roll.old_logprobs,
            roll.advantages,
            roll.loss_mask,
            clip_eps=self.epsilon,
            clip_eps_high=self.epsilon_high,
            level="sequence",
        )

    def rollout_stats(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        stats = super().rollout_stats(roll)
        if roll.ref_logprobs is not None:  # TRL's RLOO logs the k1 KL per token
            kl = torch.where(roll.loss_mask, roll.old_logprobs - roll.ref_logprobs, 0.0)
            stats["kl"] = kl.sum() / roll.loss_mask.sum().clamp(min=1)
        return stats
