"""Advantage estimators: GAE / TD(lambda) for PPO, and group baselines (GRPO, RLOO) for critic-free training.

Notation: B batch (rows), T token positions, ``r_t`` per-token reward, ``V_t`` value estimate, ``gamma`` discount,
``lam`` the GAE / TD(lambda) parameter, ``mask`` True on response tokens, G group size (completions per prompt).

GAE (Schulman et al. 2016), as in TRL's former PPOTrainer and torchtune::

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                      (the TD(lambda) return, the value target)

with ``V`` and ``A`` zero after the last response token (the episode ends there). ``lam = 0`` gives the TD(0)
advantage ``r_t + gamma V_{t+1} - V_t``; ``lam = 1`` gives the Monte-Carlo advantage ``sum_k gamma^k r_{t+k} - V_t``
(and returns that no longer depend on ``V``).

Masks: the recursion links each valid token to the *next valid token of the same row*; masked positions are skipped
(their advantage and return are 0 and their reward and value are never read). For the usual masks -- leading prompt
zeros, a contiguous response, trailing padding -- this is exactly the formula above; for masks with holes (e.g.
tool-output tokens inside an agent's trajectory) the holes are treated as not being actions, as verl does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_llm.rlhf._validation import (
    check_choice,
    check_finite,
    check_float,
    check_mask,
    check_range,
    check_same_shape,
    check_scored_logps,
)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over the batch (one reverse pass over time).

    Args:
        rewards: ``(B, T)`` per-token rewards, e.g. from
            :func:`~lightning_llm.rlhf.kl.kl_penalized_rewards`. Must be finite on valid tokens.
        values: ``(B, T)`` value estimates ``V_t`` of the state before each response token (the value head's output
            at the position that predicts token t). Must be finite on valid tokens.
        mask: ``(B, T)`` True on response tokens (see the module docstring for how gaps are handled).
        gamma: discount in [0, 1]; 1 (default) for the undiscounted episodic RLHF setting.
        lam: GAE lambda in [0, 1]; default 0.95. 0 -> TD(0), 1 -> Monte Carlo.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, 0 on masked positions, computed without gradient tracking
        (they are targets). Whiten the advantages with :func:`~lightning_llm.rlhf.stats.masked_whiten` for PPO.

    Example:
        >>> r = torch.tensor([[1.0, 0.0, 2.0]])
        >>> v = torch.tensor([[0.5, 1.0, 1.5]])
        >>> adv, ret = gae(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.5)
        >>> [round(a, 5) for a in adv[0].tolist()]  # deltas 1.4, 0.35, 0.5; A = delta + 0.45 * A_next
        [1.65875, 0.575, 0.5]
    """
    fn = "gae"
    check_float(fn, "rewards", rewards, ndim=2)
    check_float(fn, "values", values, ndim=2)
    check_same_shape(fn, rewards=rewards, values=values)
    mask = check_mask(fn, mask, rewards.shape)
    gamma = check_range(fn, "gamma", gamma, 0.0, 1.0)
    lam = check_range(fn, "lam", lam, 0.0, 1.0)
    check_finite(fn, "rewards", rewards, mask)
    check_finite(fn, "values", values, mask)

    with torch.no_grad():
        dtype = torch.promote_types(rewards.dtype, values.dtype)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # a long reverse recursion in half precision drifts
        zero = torch.zeros((), dtype=dtype, device=rewards.device)
        r = torch.where(mask, rewards.to(dtype), zero)
        v = torch.where(mask, values.to(dtype), zero)
        batch, steps = r.shape
        advantages = torch.zeros_like(r)
        next_value = torch.zeros(batch, dtype=dtype, device=r.device)  # V of the next valid token (0 past the end)
        next_adv = torch.zeros(batch, dtype=dtype, device=r.device)  # A of the next valid token
        for t in reversed(range(steps)):
            m_t = mask[:, t]
            delta = r[:, t] + gamma * next_value - v[:, t]
            adv_t = torch.where(m_t, delta + gamma * lam * next_adv, zero)
            advantages[:, t] = adv_t
            next_value = torch.where(m_t, v[:, t], next_value)
            next_adv = torch.where(m_t, adv_t, next_adv)
        returns = torch.where(mask, advantages + v, zero)
    out_dtype = torch.promote_types(rewards.dtype, values.dtype)
    return advantages.to(out_dtype), returns.to(out_dtype)


def td_lambda_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> Tensor:
    """TD(lambda) returns ``R_t = A_t + V_t`` (the value-function targets); see :func:`gae` for the arguments.

    ``lam = 0``: ``r_t + gamma V_{t+1}``; ``lam = 1``: the discounted Monte-Carlo return ``sum_k gamma^k r_{t+k}``.
    """
    return gae(rewards, values, mask, gamma=gamma, lam=lam)[1]


def _check_group_scores(fn: str, scores: torch.Tensor, group_size: int) -> torch.Tensor:
    check_float(fn, "scores", scores, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{fn}: `group_size` must be a positive integer, got {group_size!r}.")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"{fn}: the number of scores ({scores.shape[0]}) must be a multiple of `group_size` ({group_size}); "
            "lay the batch out as consecutive groups of completions of the same prompt."
        )
    check_finite(fn, "scores", scores)
    return scores.view(-1, group_size)  # (num_prompts, G)


SCALE_REWARDS = ("group", "batch", "none")
"""``scale_rewards`` options of :func:`group_relative_advantages` (TRL's ``GRPOConfig.scale_rewards``)."""


def group_relative_advantages(
    scores: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-4,
    scale_rewards: str | None = None,
) -> torch.Tensor:
    """GRPO's group-relative advantage: each completion's score minus its group's mean, optionally over the std.

    ``A_i = (s_i - mean_group(s)) / (std_group(s) + eps)`` with the unbiased std, as TRL's ``GRPOTrainer``
    (``scale_rewards="group"``; ``normalize_std=False`` is its ``"none"``). The same advantage applies to every token
    of the completion: pass the ``(B,)`` result straight to :func:`~lightning_llm.rlhf.losses.policy_loss`.

    Args:
        scores: ``(B,)`` sequence scores, laid out as ``B / group_size`` consecutive groups (TRL's
            ``repeat_interleave`` order: rows ``[0, G)`` answer prompt 0, ``[G, 2G)`` prompt 1, ...).
        group_size: completions per prompt ``G``; with ``G == 1`` the advantages are all 0 (no baseline signal).
        normalize_std: divide by the group's standard deviation (+ ``eps``).
        eps: added to the std (TRL's 1e-4).
        scale_rewards: TRL's option, overrides ``normalize_std`` when given: ``"group"`` (the group's std),
            ``"batch"`` (the std of all ``B`` scores, PPO-Lite; the mean is still the group's) or ``"none"``
            (Dr. GRPO's unscaled advantage).

    Returns:
        ``(B,)`` advantages.
    """
    fn = "group_relative_advantages"
    grouped = _check_group_scores(fn, scores, group_size)
    if scale_rewards is None:
        scale_rewards = "group" if normalize_std else "none"
    check_choice(fn, "scale_rewards", scale_rewards, SCALE_REWARDS)
    if group_size == 1:
        return torch.zeros_like(scores)
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # (num_prompts, G)
    if scale_rewards == "group":
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        adv = adv / ((scores.std() if scores.numel() > 1 else scores.new_zeros(())) + eps)
    return adv.reshape(-1)  # (B,)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantage: each score minus the mean of the *other* completions of its prompt.

    ``A_i = s_i - (sum_group(s) - s_i) / (G - 1)`` (Kool et al. 2019; Ahmadian et al. 2024; TRL's ``RLOOTrainer``).
    Equal to ``G / (G - 1)`` times the group-mean-centred score. Whiten the result (e.g.
    :func:`~lightning_llm.rlhf.stats.masked_whiten` with an all-True mask) if you want TRL's
    ``normalize_advantages=True``.

    Args:
        scores: ``(B,)`` sequence scores in consecutive groups of ``group_size`` (see
            :func:`group_relative_advantages`).
        group_size: completions per prompt, >= 2.

    Returns:
        ``(B,)`` advantages.
    """
    fn = "rloo_advantages"
    grouped = _check_group_scores(fn, scores, group_size)
    if group_size < 2:
        raise ValueError(f"{fn}: the leave-one-out baseline needs `group_size` >= 2, got {group_size}.")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (num_prompts, G)
    return (grouped - baseline).reshape(-1)  # (B,)


def sequence_kl_penalized_scores(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's KL-regularised sequence reward ``r_i - beta * KL_i`` with ``KL_i = sum_t (logp_it - ref_logp_it)``.

    The k1 estimator summed over each sequence's valid tokens, as TRL's ``RLOOTrainer`` puts the KL into the reward
    before the leave-one-out baseline (use the sampling policy's log-probabilities: the KL is part of the reward,
    not of the loss, so it carries no gradient).

    Args:
        scores: ``(B,)`` sequence rewards.
        logp: ``(B, T)`` sampling-policy log-probabilities of the completion tokens.
        ref_logp: ``(B, T)`` reference log-probabilities of the same tokens.
        mask: ``(B, T)`` True on completion tokens.
        beta: KL coefficient >= 0.

    Returns:
        ``(penalised_scores, kl)``, both ``(B,)``, detached.
    """
    fn = "sequence_kl_penalized_scores"
    mask = check_scored_logps(fn, scores, logp, ref_logp, mask)
    beta = check_range(fn, "beta", beta, 0.0, None)
    with torch.no_grad():
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        kl = torch.where(mask, logp - ref_logp, zero).sum(-1)  # (B,)
        return scores - beta * kl.to(scores.dtype), kl
