"""RLHF math as plain-torch functions (no Lightning): statistics, KL, advantages, losses, KL controllers.

Read bottom-up: ``stats`` (masked mean / variance / whitening) -> ``kl`` (estimators, penalised rewards) ->
``advantages`` (GAE / TD(lambda), GRPO, RLOO) -> ``td`` (the tabular TD(0) update, TD(0) targets) -> ``logprobs``
(token log-probs, entropy) -> ``losses`` (PPO policy and value, GRPO / RLOO, the DPO family, Bradley-Terry) ->
``controllers`` (fixed and adaptive KL coefficient). ``rollout`` holds the experience dataclasses.

One PPO step with these pieces::

    logp = sequence_logprobs(logits[:, :-1], input_ids[:, 1:], mask, temperature)  # and ref_logp, old values
    rewards, kl = kl_penalized_rewards(scores, logp, ref_logp, mask, kl_ctl.value)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = masked_whiten(advantages, mask)
    # ... for each PPO epoch / minibatch, with new_logp and new_values from a fresh forward pass:
    pg_loss, pg_stats = policy_loss(new_logp, logp, advantages, mask, clip_eps=0.2)
    vf_loss, vf_clipfrac = value_loss(new_values, values, returns, mask, clip_eps=0.2)
    loss = pg_loss + 0.1 * vf_loss
    kl_ctl.update(kl.sum(1).mean(), n_steps=batch_size)
"""

from lightning_llm.rlhf.advantages import (
    SCALE_REWARDS,
    gae,
    group_relative_advantages,
    rloo_advantages,
    sequence_kl_penalized_scores,
    td_lambda_returns,
)
from lightning_llm.rlhf.controllers import AdaptiveKLController, FixedKLController
from lightning_llm.rlhf.kl import KL_KINDS, kl_estimate, kl_penalized_rewards, last_valid_index
from lightning_llm.rlhf.logprobs import entropy_from_logits, masked_entropy, sequence_logprob_sum, sequence_logprobs
from lightning_llm.rlhf.losses import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    GRPO_LOSS_TYPES,
    bradley_terry_loss,
    check_dpo_loss_config,
    dpo_loss,
    grpo_loss,
    policy_loss,
    value_loss,
)
from lightning_llm.rlhf.stats import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten
from lightning_llm.rlhf.td import RANDOM_WALK_TRUE_VALUES, random_walk_td0, td0_error, td0_targets, td0_update_

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "GRPO_LOSS_TYPES",
    "KL_KINDS",
    "RANDOM_WALK_TRUE_VALUES",
    "SCALE_REWARDS",
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "check_dpo_loss_config",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_relative_advantages",
    "grpo_loss",
    "kl_estimate",
    "kl_penalized_rewards",
    "last_valid_index",
    "masked_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "random_walk_td0",
    "rloo_advantages",
    "sequence_kl_penalized_scores",
    "sequence_logprob_sum",
    "sequence_logprobs",
    "td0_error",
    "td0_targets",
    "td0_update_",
    "td_lambda_returns",
    "value_loss",
]
