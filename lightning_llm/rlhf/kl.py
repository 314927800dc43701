"""Per-token KL estimators and the KL-penalised reward of RLHF-PPO.

Notation: B batch (rows), T token positions, ``logp`` the policy's log-probability of each sampled token,
``ref_logp`` the frozen reference model's, ``logr = ref_logp - logp`` (log of the ratio ``ref / policy``),
``mask`` True on response tokens.

The tokens were sampled from the policy, so any ``f(logr)`` whose expectation under the policy is
``KL(policy || ref)`` is an estimator of the KL (Schulman, "Approximating KL divergence", 2020):

* ``k1 = -logr`` -- unbiased, high variance, can be negative per token;
* ``k2 = logr^2 / 2`` -- biased (low bias near ``ref == policy``), always >= 0, low variance;
* ``k3 = (exp(logr) - 1) - logr`` -- unbiased and always >= 0 (computed with ``expm1`` for accuracy).

Sampling and scoring must use the same temperature, or ``logp`` is not the log-probability of the sampling
distribution and the estimates are biased (the usual cause of "negative KL").
"""

from __future__ import annotations

import torch

from lightning_llm.rlhf._validation import check_choice, check_float, check_mask, check_same_shape, check_scored_logps

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(policy || ref)`` from sampled tokens' log-probabilities.

    Args:
        logp: policy log-probabilities of the sampled tokens, any shape (usually ``(B, T)``).
        ref_logp: reference log-probabilities of the same tokens, same shape.
        kind: ``"k1"`` (``-logr``), ``"k2"`` (``logr^2 / 2``) or ``"k3"`` (``exp(logr) - 1 - logr``), with
            ``logr = ref_logp - logp``.

    Returns:
        Tensor of ``logp``'s shape. Apply a mask (e.g. :func:`~lightning_llm.rlhf.stats.masked_mean`) to average.

    Example:
        >>> logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # logr = -1
        >>> kl_estimate(logp, ref, "k1"), kl_estimate(logp, ref, "k2")
        (tensor([1.]), tensor([0.5000]))
    """
    fn = "kl_estimate"
    check_float(fn, "logp", logp)
    check_float(fn, "ref_logp", ref_logp)
    check_same_shape(fn, logp=logp, ref_logp=ref_logp)
    check_choice(fn, "kind", kind, KL_KINDS)
    logr = ref_logp - logp
    if kind == "k1":
        return -logr
    if kind == "k2":
        return 0.5 * logr.square()
    return torch.expm1(logr) - logr


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row of a ``(B, T)`` bool mask, as ``(B,)`` int64.

    Works for right padding, left padding and masks with leading prompt zeros. Rows without any True entry raise,
    because there is no token to credit.
    """
    fn = "last_valid_index"
    mask = check_mask(fn, mask, mask.shape if isinstance(mask, torch.Tensor) else ())
    if mask.dim() != 2:
        raise ValueError(f"{fn}: `mask` must be (B, T), got shape {tuple(mask.shape)}.")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"{fn}: rows {rows} of `mask` have no valid (response) token, so the sequence score has nowhere to go. "
            "Keep at least one response token per row (e.g. the EOS token) or drop those rows."
        )
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask, positions, -1).amax(dim=1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for RLHF-PPO: ``-kl_coef * KL_t`` on every response token, plus the score at the last one.

    ``r_t = -kl_coef * kl_t + score * [t == last valid position of the row]``, and 0 on padding.

    Why the score goes on the last valid response token (the choice of TRL's former PPOTrainer, torchtune and "The N
    Implementation Details of RLHF with PPO", Huang et al. 2024): the reward model scores the whole completion, which
    is only known once the final token (usually EOS) has been emitted. In the token-level MDP that final action ends
    the episode and receives the terminal reward; GAE then carries it back to earlier tokens through the value
    function. Putting it at a fixed column (e.g. ``T - 1``) would credit a padding token the policy never produced
    (it is masked out, so the score would be lost). The position is found from ``mask`` itself, so right padding,
    left padding and masks with leading prompt zeros all work.

    Args:
        scores: ``(B,)`` sequence-level scores (reward model outputs or reward-function values). Must be finite.
        logp: ``(B, T)`` policy log-probabilities of the response tokens (scored at the sampling temperature).
        ref_logp: ``(B, T)`` reference log-probabilities of the same tokens.
        mask: ``(B, T)`` True on response tokens; every row needs at least one.
        kl_coef: KL penalty coefficient ``beta`` >= 0 (e.g. :attr:`AdaptiveKLController.value`). Typical 0.05.
        kind: KL estimator, ``"k1"`` (default, as TRL / torchtune), ``"k2"`` or ``"k3"``; see :func:`kl_estimate`.

    Returns:
        ``(rewards, kl)``, both ``(B, T)`` float, 0 on padding. ``kl`` is the per-token estimate (before
        ``kl_coef``); log e.g. ``kl.sum(1).mean()`` (KL per sequence) or its masked mean.
    """
    fn = "kl_penalized_rewards"
    mask = check_scored_logps(fn, scores, logp, ref_logp, mask)
    check_choice(fn, "kind", kind, KL_KINDS)
    if isinstance(kl_coef, torch.Tensor):
        if kl_coef.numel() != 1:
            raise ValueError(f"{fn}: `kl_coef` must be a scalar, got shape {tuple(kl_coef.shape)}.")
        bad_coef = not bool(torch.isfinite(kl_coef)) or bool(kl_coef < 0)
    else:
        bad_coef = not isinstance(kl_coef, (int, float)) or not (0 <= kl_coef < float("inf"))
    if bad_coef:
        raise ValueError(f"{fn}: `kl_coef` must be a finite number >= 0, got {kl_coef!r}.")

    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = torch.where(mask, kl_estimate(torch.where(mask, logp, zero), torch.where(mask, ref_logp, zero), kind), zero)
    rewards = -kl_coef * kl
    last = last_valid_index(mask)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], scores.to(rewards.dtype)[:, None])  # (B, T)
    return rewards, kl
