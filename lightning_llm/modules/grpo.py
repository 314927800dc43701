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
   sequence-level clipped ratio (:func:`lightning_llm.rlhf.rloo_loss`).

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

import csv
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torchmetrics import MeanMetric

from lightning_llm.config import TransformerConfig
from lightning_llm.modules.base import LLMModule
from lightning_llm.modules.reward_model import RewardModel
from lightning_llm.nn.generation import GenerationOutput, check_sampling, generate
from lightning_llm.rlhf import entropy_from_logits, masked_mean, sequence_logprobs
from lightning_llm.rlhf.advantages import (
    SCALE_REWARDS,
    group_relative_advantages,
    rloo_advantages,
    sequence_kl_penalized_scores,
)
from lightning_llm.rlhf.losses import GRPO_LOSS_TYPES, grpo_loss, rloo_loss
from lightning_llm.rlhf.rewards import resolve_reward_function, reward_function_name, weighted_reward_scores
from lightning_llm.rlhf.rollout import GroupRollout

__all__ = ["GRPO", "RLOO"]


def truncate_at_eos(out: GenerationOutput, eos_id: int, pad_id: int) -> GenerationOutput:
    """Cut every row of a generation that ran all its steps at its first ``eos_id`` (kept), as
    :func:`~lightning_llm.nn.generate` with ``eos_id`` would have: later tokens become ``pad_id`` and leave the masks."""
    p = out.prompt_length
    resp = out.sequences[:, p:]  # (B, N)
    is_eos = resp == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (B, N) positions after the first EOS
    keep = ~after & out.response_mask.bool()
    resp = torch.where(keep, resp, torch.full_like(resp, pad_id))
    return GenerationOutput(
        sequences=torch.cat([out.sequences[:, :p], resp], dim=1),
        attention_mask=torch.cat([out.attention_mask[:, :p], keep.long()], dim=1),
        prompt_length=p,
        response_mask=keep.long(),
        logprobs=torch.where(keep, out.logprobs, torch.zeros_like(out.logprobs)),
        finished=is_eos.any(1),
    )


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value!r}.{hint}")
    return value


class _GroupRL(LLMModule):
    """Shared machinery of GRPO and RLOO: generation of G completions per prompt, scoring, the update loop, logging.

    Subclasses set their settings with :meth:`_init_group_rl` and implement :meth:`advantages` and :meth:`loss`.
    """

    algorithm: ClassVar[str] = "GroupRL"
    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-6, "weight_decay": 0.0, "warmup_steps": 0}
    hparams_ignore: ClassVar[tuple[str, ...]] = ("reward_functions",)

    def _init_group_rl(
        self,
        reward_model: str | None,
        reward_functions: list[Any] | None,
        reward_weights: list[float] | None,
        num_generations: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        beta: float,
        num_iterations: int,
        epsilon: float,
        epsilon_high: float | None,
        mask_truncated_completions: bool,
        num_minibatches: int,
        gradient_accumulation_steps: int,
        max_grad_norm: float | None,
        log_completions_every_n_steps: int,
        num_logged_completions: int,
        seed: int,
    ) -> None:
        owner = self.algorithm
        self.automatic_optimization = False
        _positive_int(
            owner,
            "num_generations",
            num_generations,
            2,
            " Group baselines compare completions of the same prompt, so each prompt needs at least 2 (TRL's "
            "GRPO default is 8, RLOO's 2).",
        )
        for name, value in (
            ("max_new_tokens", max_new_tokens),
            ("num_iterations", num_iterations),
            ("num_minibatches", num_minibatches),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            _positive_int(owner, name, value)
        if not temperature > 0:
            raise ValueError(
                f"{owner}: `temperature` must be > 0 (the G completions of a prompt must differ, and they are rescored "
                f"at the sampling temperature), got {temperature}."
            )
        check_sampling(temperature, top_k, top_p)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"{owner}: `beta` must be a number >= 0 (0: no reference model), got {beta!r}.")
        for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{owner}: `{name}` must be a number > 0, got {value!r}.")
        if reward_functions is not None and not isinstance(reward_functions, (list, tuple)):
            reward_functions = [reward_functions]
        self.reward_functions = [resolve_reward_function(f) for f in (reward_functions or [])]
        if reward_model is None and not self.reward_functions:
            raise ValueError(f"{owner}: give a `reward_model` checkpoint path and/or `reward_functions`; got neither.")
        weights = [1.0] * len(self.reward_functions) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(self.reward_functions):
            raise ValueError(
                f"{owner}: `reward_weights` has {len(weights)} entries for {len(self.reward_functions)} reward "
                "functions; give one weight per function."
            )
        self.reward_weights = weights
        self.reward_names = [reward_function_name(f) for f in self.reward_functions]
        if reward_model is not None:
            self.reward_names.append("reward_model")
        self.settings = {
            "reward_model": reward_model,
            "num_generations": num_generations,
            "max_new_tokens": max_new_tokens,
            "temperature": float(temperature),
            "top_k": top_k,
            "top_p": top_p,
            "beta": float(beta),
            "num_iterations": num_iterations,
            "epsilon": float(epsilon),
            "epsilon_high": float(epsilon if epsilon_high is None else epsilon_high),
            "mask_truncated_completions": bool(mask_truncated_completions),
            "num_minibatches": num_minibatches,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "max_grad_norm": max_grad_norm,
            "log_completions_every_n_steps": log_completions_every_n_steps,
            "num_logged_completions": num_logged_completions,
            "seed": seed,
        }
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self.rollouts_done = 0
        self.val_reward = MeanMetric()
        self.configure_model()  # eager: the models exist from construction

    # -------------------------------------------------------------------------------------------- models
    def needs_reference(self) -> bool:
        return self.settings["beta"] != 0.0

    def build(self) -> None:
        """The policy, its frozen reference (only when ``beta != 0``) and the frozen reward model (when given)."""
        self.policy = self.build_backbone()
        self.ref = self.make_reference(self.policy) if self.needs_reference() else None
        self.reward_model: RewardModel | None = None
        path = self.settings["reward_model"]
        if path is not None:
            self.reward_model = RewardModel.from_checkpoint(path)
            self.reward_model.requires_grad_(False).eval()
            if self.reward_model.config.vocab_size != self.config.vocab_size:
                raise ValueError(
                    f"{self.algorithm}: tokenizer mismatch between policy and reward model: the reward model {path!r} "
                    f"has vocab_size {self.reward_model.config.vocab_size}, the policy {self.config.vocab_size}. Train "
                    "the reward model with the same tokenizer as the policy's prompt data."
                )

    def transformers(self) -> list[torch.nn.Module]:
        models = [self.policy, self.ref, self.reward_model.backbone if self.reward_model is not None else None]
        return [m for m in models if m is not None]

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
        temperature = self.settings["temperature"]
        logp = sequence_logprobs(logits, sequences[:, p:], mask, temperature)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach(), temperature=temperature, mask=mask)  # (B, N)
        return logp, entropy

    # -------------------------------------------------------------------------------------------- rollout
    @property
    def generator(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.settings["seed"] + 1000 * self.global_rank)
            if self._generator_state is not None:
                g.set_state(self._generator_state)
                self._generator_state = None
            self._generator = g
        return self._generator

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        owner = self.algorithm
        if not prompt_ids:
            raise ValueError(f"{owner}: the batch has no prompts.")
        longest = max(len(p) for p in prompt_ids)
        n_new = self.settings["max_new_tokens"]
        limits = [("policy", self.config.block_size)]
        if self.reward_model is not None:
            limits.append(("reward model", self.reward_model.config.block_size))
        for what, block in limits:
            if longest + n_new > block:
                raise ValueError(
                    f"{owner}: a prompt of {longest} tokens plus max_new_tokens={n_new} exceeds the {what}'s context "
                    f"(block_size={block}). Shorten or filter the prompts, lower max_new_tokens, or use a model with a "
                    "larger block_size."
                )

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        if self.tokenizer is None:
            return [" ".join(map(str, row[m].tolist())) for row, m in zip(tokens, mask)]
        return [self.tokenizer.decode(row[m].tolist()) for row, m in zip(tokens, mask)]

    def score(
        self, prompts: list[str], completions: list[str], sequences: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total (B,), per_function (B, F))``: the reward functions' weighted sum plus the reward model's score."""
        total, per_fn = weighted_reward_scores(
            self.reward_functions, self.reward_weights, prompts, completions, owner=self.algorithm
        )
        columns = [per_fn[name] for name in per_fn]
        total = total.to(sequences.device)
        if self.reward_model is not None:
            with torch.no_grad():
                rm = self.reward_model(sequences, attention_mask).float()  # (B,)
            if not bool(torch.isfinite(rm).all()):
                raise ValueError(f"{self.algorithm}: the reward model returned non-finite scores.")
            total = total + rm
            columns.append(rm.cpu())
        per_function = torch.stack(columns, dim=1).to(sequences.device)  # (B, F)
        return total, per_function

    def needs_old_logprobs(self) -> bool:
        """Whether the sampling policy's log-probs differ from the current ones at some update (TRL's rule)."""
        return self.settings["num_iterations"] > 1 or self.settings["num_minibatches"] > 1

    @torch.no_grad()
    def rollout(self, prompts: list[str], prompt_ids: list[list[int]]) -> GroupRollout:
        """Sample G completions per prompt, score them and compute the advantages."""
        s = self.settings
        self._check_prompts(prompt_ids)
        g = s["num_generations"]
        prompts = [p for p in prompts for _ in range(g)]  # (B * G) TRL's repeat_interleave order
        prompt_ids = [list(p) for p in prompt_ids for _ in range(g)]
        eos_id = self.tokenizer.eos_id if self.tokenizer is not None else None
        pad_id = self.tokenizer.pad_id if self.tokenizer is not None else 0
        was_training = self.training
        self.eval()
        # Sharded (FSDP2) models all-gather in every forward, so every rank must decode the same number of steps:
        # there, decode all max_new_tokens steps and cut each row at its first EOS afterwards (same distribution).
        sharded = self._device_mesh is not None
        out = generate(
            self.policy,
            prompt_ids,
            max_new_tokens=s["max_new_tokens"],
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            eos_id=None if sharded else eos_id,
            pad_id=pad_id,
            generator=self.generator,
        )
        if sharded and eos_id is not None:
            out = truncate_at_eos(out, eos_id, pad_id)
        seq, attn, p = out.sequences, out.attention_mask, out.prompt_length
        cmask = out.response_mask.bool()  # (B*G, N)
        completions = self._decode(seq[:, p:], cmask)
        rewards, per_function = self.score(prompts, completions, seq, attn)
        lmask = cmask & out.finished[:, None] if s["mask_truncated_completions"] else cmask
        old = None
        if self.needs_old_logprobs():
            old, _ = self.completion_logprobs(self.policy, seq, attn, p, cmask)
        ref = None
        if self.ref is not None:
            ref, _ = self.completion_logprobs(self.ref, seq, attn, p, cmask)
        self.train(was_training)
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
        s = self.settings
        opt = self.optimizers()
        b = len(roll)
        n_mb = min(s["num_minibatches"], b)
        total_items = self._num_items(roll)
        sums: dict[str, tuple[float, int]] = {}
        self.train()
        for _ in range(s["num_iterations"]):
            order = torch.randperm(b, generator=self.generator, device=self.device)
            for mb in order.tensor_split(n_mb):
                micro = [m for m in mb.tensor_split(min(s["gradient_accumulation_steps"], len(mb))) if len(m)]
                # TRL's dapo normaliser (num_items / num_processes * accumulation / steps_per_generation): the
                # expected active tokens of one optimiser step, the same for each of its micro-batches
                num_items = total_items / n_mb
                for idx in micro:
                    part = roll.select(idx)
                    logp, entropy = self.completion_logprobs(
                        self.policy, part.sequences, part.attention_mask, part.prompt_length, part.completion_mask, True
                    )
                    loss, stats = self.loss(part, logp, num_items)
                    scale = 1.0 if self.accumulates_by_sum() else 1.0 / len(micro)
                    self.manual_backward(loss * scale)
                    stats["entropy"] = masked_mean(entropy, part.completion_mask)
                    stats["loss"] = loss.detach()
                    for k, v in stats.items():  # the same keys on every rank (each is one synchronised log call)
                        v = float(v)
                        total, n = sums.get(k, (0.0, 0))
                        sums[k] = (total + v, n + 1) if v == v else (total, n)  # NaN (no valid token) not counted
                if s["max_grad_norm"] is not None:
                    self.clip_gradients(opt, gradient_clip_val=s["max_grad_norm"], gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad(set_to_none=True)
        return {k: total / n if n else float("nan") for k, (total, n) in sums.items()}

    def accumulates_by_sum(self) -> bool:
        """True when each micro-batch's loss is already normalised for the whole optimiser step (``dapo``)."""
        return False

    # -------------------------------------------------------------------------------------------- steps
    def rollout_stats(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        g = self.settings["num_generations"]
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
        self.rollouts_done += 1
        bs = len(roll)
        for k, v in logs.items():
            self.log(
                f"train/{k}",
                v.float().to(self.device),
                prog_bar=k in ("reward", "kl"),
                batch_size=bs,
                sync_dist=True,
                on_step=True,
                on_epoch=False,
            )
        self.log("train/rollout", float(self.rollouts_done), batch_size=bs, on_step=True, on_epoch=False)
        every = self.settings["log_completions_every_n_steps"]
        if every and (self.rollouts_done == 1 or self.rollouts_done % every == 0):
            self.log_completions(roll)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch["prompt"], batch["prompt_ids"])
        bs = len(roll)
        self.val_reward.update(roll.rewards.mean(), weight=bs)
        self.log("val/reward", self.val_reward, prog_bar=True, batch_size=bs)

    def log_completions(self, roll: GroupRollout) -> None:
        """Log a few (prompt, completion, reward, advantage) rows: ``logger.log_text`` when available, else a CSV."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        n = min(self.settings["num_logged_completions"], len(roll))
        rows = [
            [
                self.rollouts_done,
                roll.prompts[i],
                roll.completions[i],
                float(roll.rewards[i]),
                float(roll.advantages[i]),
            ]
            for i in range(n)
        ]
        columns = ["rollout", "prompt", "completion", "reward", "advantage"]
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
                f"{self.algorithm}: tokenizer mismatch between policy and reward model: the prompt data uses "
                f"{tokenizer!r}, the reward model {self.settings['reward_model']!r} was trained with {rm_tok!r}. The reward "
                "model scores the policy's token ids, so both must use the same tokenizer: retrain the reward model on "
                "data tokenized like the prompts, or set the prompt data's `tokenizer` to the reward model's."
            )

    def configure_optimizers(self) -> Any:
        """AdamW over the policy; a constant learning rate unless a ``scheduler`` callable is given (manual
        optimisation: ``num_iterations x num_minibatches`` steps per generation batch)."""
        optimizer = self.make_optimizer(self.trainable_parameters())
        if self.scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rollouts_done"] = self.rollouts_done
        super().on_save_checkpoint(checkpoint)
        if self._generator is not None:
            checkpoint["generator_state"] = self._generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts_done = int(checkpoint.get("rollouts_done", 0))
        super().on_load_checkpoint(checkpoint)
        if "generator_state" in checkpoint:
            self._generator_state = checkpoint["generator_state"]
            self._generator = None


class GRPO(_GroupRL):
    """Group Relative Policy Optimization (Shao et al. 2024) with TRL 1.16's options (see the module docstring).

    Args:
        reward_model: path of a :class:`RewardModel` checkpoint (weight 1); its tokenizer must equal the policy's.
        reward_functions: callables (or import paths / ``class_path`` dicts) with TRL's reward-function signature.
        reward_weights: one weight per reward function (default 1.0 each).
        num_generations: completions per prompt G >= 2 (TRL's 8).
        max_new_tokens: the completion budget (TRL's ``max_completion_length``; ``dr_grpo``'s constant).
        temperature, top_k, top_p: sampling (``temperature`` > 0; log-probs are rescored at it).
        beta: KL coefficient (TRL's default 0.0: no reference model is built).
        num_iterations: updates per generation batch (TRL's mu, default 1).
        epsilon, epsilon_high: clip range of the ratio (``epsilon_high`` defaults to ``epsilon``; DAPO: 0.28).
        scale_rewards: ``"group"`` (default), ``"batch"`` or ``"none"`` (see the module docstring).
        loss_type: ``"dapo"`` (TRL's default), ``"grpo"``, ``"bnpo"`` or ``"dr_grpo"``.
        mask_truncated_completions: exclude completions without EOS from the loss.
        num_minibatches: optimiser steps per iteration over the generation batch (TRL's ``steps_per_generation``).
        gradient_accumulation_steps: micro-batches per optimiser step.
        max_grad_norm: gradient clipping (TRL's 1.0).
        log_completions_every_n_steps, num_logged_completions: sample completions to the logger or a CSV.
        seed: seed of the sampler (offset by the process rank).
        **kwargs: the shared arguments of :class:`~lightning_llm.modules.base.LLMModule` (``pretrained``, ``dtype``,
            optimiser: AdamW with a constant lr 1e-6 and no weight decay by default, as TRL's ``GRPOConfig``).
    """

    algorithm: ClassVar[str] = "GRPO"

    def __init__(
        self,
        config: TransformerConfig | None = None,
        reward_model: str | None = None,
        reward_functions: list[Any] | None = None,
        reward_weights: list[float] | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        scale_rewards: str = "group",
        loss_type: str = "dapo",
        mask_truncated_completions: bool = False,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        log_completions_every_n_steps: int = 50,
        num_logged_completions: int = 4,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        if scale_rewards is True or scale_rewards is False:  # TRL accepts booleans
            scale_rewards = "group" if scale_rewards else "none"
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"GRPO: `scale_rewards` must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}.")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"GRPO: `loss_type` must be one of {list(GRPO_LOSS_TYPES)}, got {loss_type!r}.")
        self.scale_rewards, self.loss_type = scale_rewards, loss_type
        self._init_group_rl(
            reward_model,
            reward_functions,
            reward_weights,
            num_generations,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            beta,
            num_iterations,
            epsilon,
            epsilon_high,
            mask_truncated_completions,
            num_minibatches,
            gradient_accumulation_steps,
            max_grad_norm,
            log_completions_every_n_steps,
            num_logged_completions,
            seed,
        )

    def advantages(self, roll: GroupRollout) -> torch.Tensor:
        return group_relative_advantages(
            roll.rewards, self.settings["num_generations"], scale_rewards=self.scale_rewards
        )

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
            beta=self.settings["beta"],
            clip_eps=self.settings["epsilon"],
            clip_eps_high=self.settings["epsilon_high"],
            loss_type=self.loss_type,
            max_completion_length=self.settings["max_new_tokens"],
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
        The other arguments are :class:`GRPO`'s.
    """

    algorithm: ClassVar[str] = "RLOO"

    def __init__(
        self,
        config: TransformerConfig | None = None,
        reward_model: str | None = None,
        reward_functions: list[Any] | None = None,
        reward_weights: list[float] | None = None,
        num_generations: int = 2,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        beta: float = 0.05,
        num_iterations: int = 1,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        normalize_advantages: bool = False,
        mask_truncated_completions: bool = False,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        log_completions_every_n_steps: int = 50,
        num_logged_completions: int = 4,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, **kwargs)
        self.normalize_advantages = bool(normalize_advantages)
        self._init_group_rl(
            reward_model,
            reward_functions,
            reward_weights,
            num_generations,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            beta,
            num_iterations,
            epsilon,
            epsilon_high,
            mask_truncated_completions,
            num_minibatches,
            gradient_accumulation_steps,
            max_grad_norm,
            log_completions_every_n_steps,
            num_logged_completions,
            seed,
        )

    def needs_old_logprobs(self) -> bool:
        return True  # the sequence ratio and the KL in the reward need them (TRL computes them always)

    def advantages(self, roll: GroupRollout) -> torch.Tensor:
        rewards = roll.rewards
        if roll.ref_logprobs is not None:
            rewards, _ = sequence_kl_penalized_scores(
                rewards, roll.old_logprobs, roll.ref_logprobs, roll.loss_mask, self.settings["beta"]
            )
        adv = rloo_advantages(rewards, self.settings["num_generations"])
        if self.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-4)
        return adv

    def loss(
        self, roll: GroupRollout, logp: torch.Tensor, num_items: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return rloo_loss(
            logp,
            roll.old_logprobs,
            roll.advantages,
            roll.loss_mask,
            clip_eps=self.settings["epsilon"],
            clip_eps_high=self.settings["epsilon_high"],
        )

    def rollout_stats(self, roll: GroupRollout) -> dict[str, torch.Tensor]:
        stats = super().rollout_stats(roll)
        if roll.ref_logprobs is not None:  # TRL's RLOO logs the k1 KL per token
            kl = torch.where(roll.loss_mask, roll.old_logprobs - roll.ref_logprobs, 0.0)
            stats["kl"] = kl.sum() / roll.loss_mask.sum().clamp(min=1)
        return stats
