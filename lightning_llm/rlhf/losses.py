"""RLHF losses: PPO's clipped policy and value losses, GRPO's and RLOO's clipped objectives, the DPO loss family
(TRL 1.16's), and the Bradley-Terry reward-model loss.

Notation: B batch (rows), T token positions, ``logp`` the current policy's log-probability of each sampled token,
``old_logp`` the behaviour policy's (at rollout time), ``ratio = exp(logp - old_logp)``, ``A`` advantages,
``V`` values, ``R`` returns (value targets), ``eps`` clip range, ``mask`` True on response tokens. DPO: ``c`` chosen,
``r`` rejected, ``beta`` the inverse temperature of the implicit reward ``beta * (logp - ref_logp)``.

PPO averages are token-level means over the valid tokens of the whole (mini)batch ("all means masked to the
response"), the convention of TRL's former PPOTrainer and torchtune. Every input that is a target or a statistic of
the rollout (``old_logp``, ``advantages``, ``old_values``, ``returns``) is detached; gradients flow only into
``logp`` / ``values``. Padded entries are zeroed before use, so they neither change the loss nor receive NaN
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_llm.rlhf._validation import (
    check_choice,
    check_finite,
    check_float,
    check_mask,
    check_range,
    check_rows,
    check_same_shape,
)
from lightning_llm.rlhf.stats import masked_mean


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_advantages(fn: str, advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``advantages`` per token ``(B, T)`` as ``logp``, or per sequence ``(B,)``, returned as ``(B, 1)``."""
    check_float(fn, "advantages", advantages, ndim=(1, 2))
    if advantages.dim() == 2:
        check_same_shape(fn, logp=logp, advantages=advantages)
        return advantages
    check_rows(fn, "advantages", advantages, logp)
    return advantages[:, None]  # (B, 1)


def _clip_range(fn: str, clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
    """``(eps_low, eps_high)``, both > 0; ``eps_high`` defaults to ``eps_low``."""
    low = check_range(fn, "clip_eps", clip_eps, 0.0, None, low_inclusive=False)
    high = low if clip_eps_high is None else check_range(fn, "clip_eps_high", clip_eps_high, 0.0, None, False)
    return low, high


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, ``masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    ``level`` says what one importance ratio covers. ``"token"`` (PPO, the default): one ratio per token, the loss a
    masked mean over the valid tokens. ``"sequence"`` (RLOO, as TRL 1.16's ``RLOOTrainer``): one ratio per sequence,
    ``rho_i = exp(sum_t logp_it - sum_t old_logp_it)`` over its valid tokens, and
    ``loss = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)``; the KL to the reference is then
    not in the loss but in the reward (``r - beta * KL_seq``) before the leave-one-out baseline
    (:func:`~lightning_llm.rlhf.advantages.rloo_advantages`). The same clipped objective either way; the level only
    decides whether a token's or a whole completion's probability change is clipped.

    Args:
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the current policy (with gradient).
        old_logp: ``(B, T)`` the same under the policy that sampled them (detached).
        advantages: ``(B, T)`` per-token advantages (e.g. whitened GAE), or ``(B,)`` one per sequence (GRPO /
            RLOO), broadcast over the tokens. Detached.
        mask: ``(B, T)`` True on response tokens.
        clip_eps: clip range ``eps`` > 0 (default 0.2).
        clip_eps_high: upper clip range if different ("clip-higher", DAPO); default ``clip_eps``.
        level: ``"token"`` or ``"sequence"`` (see above). At the sequence level ``advantages`` must be ``(B,)`` and
            ``old_logp`` may be given as its ``(B,)`` masked sums.

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of detached scalars. At the sequence level: ``clip_ratio_low``,
        ``clip_ratio_high``, ``clip_ratio_region`` (fractions of sequences, TRL's RLOO names) and ``ratio_mean``. At
        the token level, all masked means over valid tokens:

        * ``clipfrac``: fraction of tokens where the clipped term is the active one (``-A*clip(ratio) > -A*ratio``,
          TRL's definition);
        * ``approx_kl``: the k3 estimate of ``KL(old || new)``, ``(ratio - 1) - log(ratio)`` -- unbiased because
          the tokens were sampled from the old policy, and >= 0 (not the ``0.5 * logr^2`` k2 variant);
        * ``ratio_mean`` and ``ratio_max``: of ``ratio`` over valid tokens.
    """
    fn = "policy_loss"
    if check_choice(fn, "level", level, ("token", "sequence")) == "sequence":
        eps_low, eps_high = _clip_range(fn, clip_eps, clip_eps_high)
        return _sequence_policy_loss(fn, logp, old_logp, advantages, mask, eps_low, eps_high)
    check_float(fn, "logp", logp, ndim=2)
    check_float(fn, "old_logp", old_logp, ndim=2)
    check_same_shape(fn, logp=logp, old_logp=old_logp)
    advantages = _check_advantages(fn, advantages, logp).expand_as(logp)  # (B, T)
    mask = check_mask(fn, mask, logp.shape)
    eps_low, eps_high = _clip_range(fn, clip_eps, clip_eps_high)
    check_finite(fn, "advantages", advantages, mask)
    check_finite(fn, "old_logp", old_logp, mask)

    adv = _zero_pad(advantages.detach(), mask)
    log_ratio = _zero_pad(logp, mask) - _zero_pad(old_logp.detach(), mask)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), mask)
    with torch.no_grad():
        lr = log_ratio.detach()
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(lr.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(lr) - lr, mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
            "ratio_max": torch.where(mask, ratio.detach(), torch.full_like(lr, float("-inf"))).max(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped value loss, ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))``.

    Multiply by ``vf_coef`` (0.1 in the N-implementation-details setting) when adding it to the policy loss.

    Args:
        values: ``(B, T)`` current value predictions (with gradient).
        old_values: ``(B, T)`` value predictions at rollout time (detached).
        returns: ``(B, T)`` value targets, e.g. from :func:`~lightning_llm.rlhf.advantages.gae` (detached).
        mask: ``(B, T)`` True on response tokens.
        clip_eps: value clip range ``eps_v`` > 0 (default 0.2); ``None`` disables clipping (plain
            ``0.5 * (V - R)^2``).

    Returns:
        ``(loss, value_clipfrac)``: the scalar loss, and the detached fraction of valid tokens where the clipped
        term is the larger one (TRL's ``vf_clipfrac``; 0 without clipping).
    """
    fn = "value_loss"
    check_float(fn, "values", values, ndim=2)
    check_float(fn, "old_values", old_values, ndim=2)
    check_float(fn, "returns", returns, ndim=2)
    check_same_shape(fn, values=values, old_values=old_values, returns=returns)
    mask = check_mask(fn, mask, values.shape)
    check_finite(fn, "returns", returns, mask)
    check_finite(fn, "old_values", old_values, mask)
    v = _zero_pad(values, mask)
    target = _zero_pad(returns.detach(), mask)
    unclipped = (v - target).square()
    if clip_eps is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        return loss, torch.zeros((), dtype=loss.dtype, device=loss.device)
    eps = check_range(fn, "clip_eps", clip_eps, 0.0, None, low_inclusive=False)
    old = _zero_pad(old_values.detach(), mask)
    v_clipped = old + torch.clamp(v - old, -eps, eps)
    clipped = (v_clipped - target).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(unclipped.dtype), mask)
    return loss, clipfrac


#: Every DPO loss type TRL 1.16's ``DPOTrainer`` implements (``DPOConfig.loss_type``), in its order.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""Loss aggregations of :func:`grpo_loss` (TRL 1.16's ``GRPOConfig.loss_type`` values with a clipped ratio)."""


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped objective with a per-token KL to the reference, aggregated as TRL's ``loss_type`` says.

    Per token ``l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL3_t`` with
    ``rho_t = exp(logp_t - old_logp_t)`` and ``KL3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1`` (the k3
    estimator of ``KL(pi || ref)``). Aggregation over the valid tokens (``mask``):

    * ``"grpo"``: mean over each sequence's tokens, then mean over sequences (length-biased, the original GRPO);
    * ``"bnpo"``: sum over the batch's tokens / their count;
    * ``"dr_grpo"``: sum / (B * ``max_completion_length``) (Dr. GRPO's constant normaliser);
    * ``"dapo"``: sum / ``num_items``, the active tokens of the whole (accumulated, global) generation batch (DAPO).

    With one update per generation ``old_logp = logp.detach()``: ``rho = 1`` but the gradient still flows.

    Args:
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the current policy (with gradient).
        old_logp: ``(B, T)`` the same under the sampling policy (detached).
        advantages: ``(B,)`` one advantage per sequence (broadcast over its tokens), or ``(B, T)``.
        mask: ``(B, T)`` True on tokens that count (the completion, minus masked truncated completions).
        ref_logp: ``(B, T)`` reference log-probabilities; required when ``beta != 0``.
        beta: KL coefficient >= 0 (TRL's default 0: no reference needed).
        clip_eps: lower clip range ``eps_low`` > 0 (TRL's ``epsilon``, 0.2).
        clip_eps_high: upper clip range (TRL's ``epsilon_high``; DAPO recommends 0.28); default ``clip_eps``.
        loss_type: one of :data:`GRPO_LOSS_TYPES` (TRL's default ``"dapo"``).
        max_completion_length: ``dr_grpo``'s constant (default ``T``).
        num_items: ``dapo``'s normaliser (default: the valid tokens of this batch, ``mask.sum()``).

    Returns:
        ``(loss, stats)``: stats are detached scalars, masked means over valid tokens: ``clip_ratio_low``,
        ``clip_ratio_high``, ``clip_ratio_region`` (TRL's definitions: the ratio left the clip range on the side where
        clipping binds), ``ratio_mean``, and ``kl`` (mean k3 KL, only when ``beta != 0``).
    """
    fn = "grpo_loss"
    check_float(fn, "logp", logp, ndim=2)
    check_float(fn, "old_logp", old_logp, ndim=2)
    check_same_shape(fn, logp=logp, old_logp=old_logp)
    advantages = _check_advantages(fn, advantages, logp)  # (B, T) or (B, 1)
    mask = check_mask(fn, mask, logp.shape)
    check_choice(fn, "loss_type", loss_type, GRPO_LOSS_TYPES)
    eps_low, eps_high = _clip_range(fn, clip_eps, clip_eps_high)
    beta = check_range(fn, "beta", beta, 0.0, None)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"{fn}: `beta` is {beta} but no `ref_logp` was given; pass the reference log-probs.")
        check_float(fn, "ref_logp", ref_logp, ndim=2)
        check_same_shape(fn, logp=logp, ref_logp=ref_logp)
        check_finite(fn, "ref_logp", ref_logp, mask)
    check_finite(fn, "advantages", advantages)
    check_finite(fn, "old_logp", old_logp, mask)

    m = mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)
    logp_z = _zero_pad(logp, mask)
    ratio = torch.exp(logp_z - _zero_pad(old_logp.detach(), mask))  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    kl = None
    if beta != 0.0:
        logr = _zero_pad(ref_logp.detach(), mask) - logp_z
        kl = torch.exp(logr) - logr - 1  # (B, T) k3
        per_token = per_token + beta * kl
    total = (per_token * m).sum()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = total / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = logp.shape[1] if max_completion_length is None else max_completion_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{fn}: `max_completion_length` must be a positive integer, got {length!r}.")
        loss = total / (logp.shape[0] * length)
    else:  # dapo
        n = m.sum() if num_items is None else torch.as_tensor(num_items, dtype=logp.dtype, device=logp.device)
        loss = total / n.clamp(min=1.0)
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0) & mask
        high = (ratio > 1 + eps_high) & (adv > 0) & mask
        stats = {
            "clip_ratio_low": masked_mean(low.to(logp.dtype), mask),
            "clip_ratio_high": masked_mean(high.to(logp.dtype), mask),
            "clip_ratio_region": masked_mean((low | high).to(logp.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask)
    return loss, stats


def _sequence_policy_loss(
    fn: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_loss` at ``level="sequence"``: ``(loss, stats)`` with one importance ratio per sequence."""
    check_float(fn, "logp", logp, ndim=2)
    check_float(fn, "old_logp", old_logp, ndim=(1, 2))
    check_float(fn, "advantages", advantages, ndim=1)
    mask = check_mask(fn, mask, logp.shape)
    check_rows(fn, "advantages", advantages, logp)
    check_finite(fn, "advantages", advantages)
    if old_logp.dim() == 2:
        check_same_shape(fn, logp=logp, old_logp=old_logp)
        check_finite(fn, "old_logp", old_logp, mask)
        old_seq = _zero_pad(old_logp.detach(), mask).sum(-1)  # (B,)
    else:
        check_rows(fn, "old_logp", old_logp, logp)
        check_finite(fn, "old_logp", old_logp)
        old_seq = old_logp.detach()
    seq = _zero_pad(logp, mask).sum(-1)  # (B,)
    adv = advantages.detach().to(seq.dtype)
    ratio = torch.exp(seq - old_seq.to(seq.dtype))
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = (-torch.min(ratio * adv, clipped * adv)).mean()
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        stats = {
            "clip_ratio_low": low.to(seq.dtype).mean(),
            "clip_ratio_high": high.to(seq.dtype).mean(),
            "clip_ratio_region": (low | high).to(seq.dtype).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
#: The f-divergence regularisers of f-DPO (Wang et al. 2023), TRL's ``f_divergence_type``.
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The loss types built on the chosen-minus-rejected score difference, the only ones with an f-divergence form (TRL).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
#: The loss types that read ``label_smoothing``; TRL 1.16 ignores it for every other type (its ``"sigmoid"`` included).
LABEL_SMOOTHING_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")
#: The loss types that need response lengths (``chosen_lengths`` / ``rejected_lengths``).
LENGTH_LOSS_TYPES = ("ipo", "sigmoid_norm", "sft")
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def check_dpo_loss_config(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    fn: str = "dpo_loss",
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate a DPO loss configuration the way TRL's ``DPOConfig`` / ``DPOTrainer`` do, with clearer messages.

    Returns:
        ``(loss_types, loss_weights)``: the loss types as a tuple (a single string becomes a 1-tuple) and their weights
        (default 1.0 each, as TRL).

    Raises:
        ValueError: an unknown loss or f-divergence type, ``loss_weights`` of the wrong length, an f-divergence other
            than ``"reverse_kl"`` with a loss that has no f-divergence form, ``"exo_pair"`` without
            ``label_smoothing`` (TRL's rule), ``label_smoothing`` outside [0, 0.5) for ``"robust"`` or given to loss
            types that ignore it, a non-positive ``discopop_tau``.
    """
    if isinstance(loss_type, str):
        types: tuple[str, ...] = (loss_type,)
    elif isinstance(loss_type, Sequence) and loss_type and all(isinstance(t, str) for t in loss_type):
        types = tuple(loss_type)
    else:
        raise ValueError(
            f"{fn}: `loss_type` must be one of {list(DPO_LOSS_TYPES)} or a non-empty list of them, got {loss_type!r}."
        )
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(
                f"{fn}: unknown `loss_type` {t!r}; expected one of {list(DPO_LOSS_TYPES)} (TRL's DPOConfig.loss_type)."
            )
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise ValueError(f"{fn}: `loss_weights` must be a list of floats or None, got {loss_weights!r}.")
        if len(loss_weights) != len(types):
            raise ValueError(
                f"{fn}: `loss_weights` must have one weight per loss type: {len(types)} for loss_type={list(types)}, "
                f"got {len(loss_weights)} ({list(loss_weights)}). Pass {len(types)} weights, or None for 1.0 each."
            )
        weights = tuple(check_range(fn, f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))
    check_choice(fn, "f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
    if f_divergence_type != "reverse_kl":
        unsupported = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"{fn}: `f_divergence_type`={f_divergence_type!r} is only defined for the loss types "
                f"{list(F_DIVERGENCE_LOSS_TYPES)}; got {unsupported}. Use f_divergence_type='reverse_kl' with them."
            )
    check_range(fn, "f_alpha_divergence_coef", f_alpha_divergence_coef)
    ls = check_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=False)
    if ls > 0 and not any(t in LABEL_SMOOTHING_LOSS_TYPES for t in types):
        raise ValueError(
            f"{fn}: `label_smoothing`={ls} is read only by the loss types {list(LABEL_SMOOTHING_LOSS_TYPES)}; "
            f"loss_type={list(types)} ignores it (TRL 1.x's 'sigmoid' has no label smoothing). For conservative / "
            "robust DPO use loss_type='robust', or set label_smoothing=0."
        )
    if "robust" in types and not ls < 0.5:
        raise ValueError(f"{fn}: `label_smoothing` must lie in [0, 0.5) for loss_type='robust', got {ls}.")
    if "exo_pair" in types and ls == 0.0:
        raise ValueError(
            f"{fn}: loss_type='exo_pair' needs `label_smoothing` > 0 (its epsilon; the EXO paper recommends 1e-3)."
        )
    check_range(fn, "discopop_tau", discopop_tau, 0.0, None, low_inclusive=False)
    return types, weights


def _f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """``f'(pi / pi_ref)`` of the f-DPO paper from ``logratios = log(pi / pi_ref)`` (TRL's ``f_divergence_type``)."""
    if f_divergence_type == "reverse_kl":  # f'(t) = log t + 1; the constant cancels in the difference
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1 / t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(logratios)
    # alpha divergence: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1); alpha -> 1 is the reverse-KL limit
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    t = (alpha - 1.0) * logratios
    clamp_max = 11.0 if t.dtype == torch.float16 else 80.0  # exp stays representable after casting back (TRL's)
    return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)


def _check_lengths(fn: str, shape: torch.Size, **lengths: torch.Tensor | None) -> None:
    for name, t in lengths.items():
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: `{name}` must be a {tuple(shape)} tensor of response token counts, got {got}.")


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss family of TRL 1.16's ``DPOTrainer`` (Rafailov et al. 2023 and its successors), on sequence
    log-probabilities.

    Notation: ``lc = logp_c - ref_c`` and ``lr = logp_r - ref_r`` (log-ratios, log-probabilities summed over the
    response tokens); ``sc, sr`` the f-divergence scores ``f'(exp(lc))``, ``f'(exp(lr))`` (``= lc, lr`` for the
    default ``"reverse_kl"``, i.e. standard DPO); ``d = sc - sr``; ``Nc, Nr`` response token counts; ``ls`` label
    smoothing; ``b`` beta. Per pair:

    * ``"sigmoid"`` (DPO): ``-logsigmoid(b d)``.
    * ``"hinge"`` (SLiC): ``relu(1 - b d)``.
    * ``"ipo"`` (Azar et al.): ``(sc / Nc - sr / Nr - 1 / (2 b))^2``, length-averaged as TRL (needs the lengths).
    * ``"exo_pair"`` (EXO): ``q_w (log q_w - log(1 - ls)) + q_l (log q_l - log ls)``, ``q_w = sigmoid(b d)``,
      ``q_l = sigmoid(-b d)``; needs ``ls > 0``.
    * ``"nca_pair"`` (NCA): ``-logsigmoid(b lc) - logsigmoid(-b lc) / 2 - logsigmoid(-b lr) / 2``.
    * ``"robust"`` (rDPO): ``(-(1 - ls) logsigmoid(b d) + ls logsigmoid(-b d)) / (1 - 2 ls)``.
    * ``"bco_pair"`` (BCO, TRL's pair form without the running reward shift): ``-logsigmoid(b lc) - logsigmoid(-b lr)``.
    * ``"sppo_hard"`` (SPPO, hard labels): ``(lc - 1 / (2 b))^2 + (lr + 1 / (2 b))^2``.
    * ``"aot"`` (AOT, paired): with ``x = sort(logp_c - logp_r)`` and ``y = sort(ref_c - ref_r)`` over the batch,
      ``-(1 - ls) logsigmoid(b (x - y)) - ls logsigmoid(-b (x - y))``.
    * ``"aot_unpaired"``: the same with ``x - y = sort(lc) - sort(lr)``.
    * ``"apo_zero"`` (APO): ``1 - sigmoid(b lc) + sigmoid(b lr)``; ``"apo_down"``:
      ``sigmoid(b lc) + 1 - sigmoid(b (lc - lr))``.
    * ``"discopop"`` (DiscoPOP): with ``z = b d`` and ``m = sigmoid(z / tau)``: ``(1 - m) (-logsigmoid(z)) + m e^-z``.
    * ``"sft"``: the negative log-likelihood of the chosen responses, ``-sum(logp_c) / sum(Nc)`` over the batch (a
      token-level mean, the same for every pair); needs ``chosen_lengths``.
    * ``"sigmoid_norm"``: ``-logsigmoid(b (sc / Nc - sr / Nr))`` (needs the lengths).

    A list of types is combined as ``sum_k w_k * mean(loss_k)`` (``loss_weights``, default 1.0 each), e.g. MPO's
    ``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``. f-divergences (f-DPO, Wang et al. 2023):
    ``"forward_kl"`` ``f'(t) = 1 - 1 / t``, ``"js_divergence"`` ``log(2t / (1 + t))``, ``"alpha_divergence"``
    ``(t^(a - 1) - 1) / (a - 1)`` with ``a = f_alpha_divergence_coef``.

    Token counts: ``chosen_lengths`` / ``rejected_lengths`` count the response tokens (TRL's ``completion_mask``); the
    ``"sft"`` term divides by the same counts (TRL uses the shifted mask there, which differs only when a response
    starts at the first position, i.e. an empty prompt).

    Args:
        policy_chosen_logp: ``(B,)`` policy log-probability of each chosen response (e.g.
            :func:`~lightning_llm.rlhf.logprobs.sequence_logprob_sum`), with gradient.
        policy_rejected_logp: ``(B,)`` same for the rejected response.
        ref_chosen_logp: ``(B,)`` reference model's, for the chosen response (detached).
        ref_rejected_logp: ``(B,)`` reference model's, for the rejected response (detached).
        beta: > 0, strength of the implicit KL regularisation (default 0.1, TRL's; IPO's tau).
        loss_type: one of :data:`DPO_LOSS_TYPES` or a list of them.
        label_smoothing: ``ls`` in [0, 1) (< 0.5 for ``"robust"``), read by :data:`LABEL_SMOOTHING_LOSS_TYPES` only.
        chosen_lengths: ``(B,)`` response token counts of the chosen responses (needed by :data:`LENGTH_LOSS_TYPES`;
            ``"ipo"`` without lengths takes already length-averaged log-probabilities).
        rejected_lengths: ``(B,)``, the same for the rejected responses.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-pair losses, weighted and summed over types).
        loss_weights: one weight per loss type (default 1.0 each).
        f_divergence_type: one of :data:`F_DIVERGENCE_TYPES` (default ``"reverse_kl"``: standard DPO).
        f_alpha_divergence_coef: ``a`` of the alpha divergence (TRL default 0.5).
        discopop_tau: DiscoPOP's temperature (TRL default 0.05).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``; the rewards are the detached implicit rewards
        ``beta * (logp - ref_logp)`` (``(B,)``, unnormalised, as TRL logs them whatever the loss type). Their
        difference is the reward margin, and ``(chosen_rewards > rejected_rewards).float().mean()`` the preference
        accuracy.
    """
    fn = "dpo_loss"
    names = ("policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp")
    tensors = (policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    for name, t in zip(names, tensors):
        check_float(fn, name, t, ndim=1)
        check_finite(fn, name, t)
    check_same_shape(fn, **dict(zip(names, tensors)))
    beta = check_range(fn, "beta", beta, 0.0, None, low_inclusive=False)
    check_choice(fn, "reduction", reduction, _REDUCTIONS)
    types, weights = check_dpo_loss_config(
        loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, fn
    )
    ls = float(label_smoothing)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{fn}: pass both `chosen_lengths` and `rejected_lengths`, or neither.")
    shape = policy_chosen_logp.shape
    if chosen_lengths is not None:
        _check_lengths(fn, shape, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        n_c = chosen_lengths.to(policy_chosen_logp.dtype).clamp(min=1.0)  # (B,)
        n_r = rejected_lengths.to(policy_chosen_logp.dtype).clamp(min=1.0)  # (B,)
    elif any(t in ("sigmoid_norm", "sft") for t in types):
        raise ValueError(
            f"{fn}: loss_type {[t for t in types if t in ('sigmoid_norm', 'sft')]} needs `chosen_lengths` and "
            "`rejected_lengths` (response token counts)."
        )
    else:  # IPO on already length-averaged log-probabilities
        n_c = n_r = torch.ones((), dtype=policy_chosen_logp.dtype, device=policy_chosen_logp.device)

    ref_c, ref_r = ref_chosen_logp.detach(), ref_rejected_logp.detach()
    lc = policy_chosen_logp - ref_c  # (B,)
    lr = policy_rejected_logp - ref_r  # (B,)
    sc = _f_divergence_scores(lc, f_divergence_type, f_alpha_divergence_coef)
    sr = _f_divergence_scores(lr, f_divergence_type, f_alpha_divergence_coef)
    d = sc - sr  # (B,)

    total = torch.zeros_like(lc)
    for t, w in zip(types, weights):
        if t == "sigmoid":
            losses = -F.logsigmoid(beta * d)
        elif t == "hinge":
            losses = torch.relu(1 - beta * d)
        elif t == "ipo":
            losses = (sc / n_c - sr / n_r - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            z = beta * d
            log_pw, log_pl = math.log1p(-ls), math.log(ls)
            losses = torch.sigmoid(z) * (F.logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_pl)
        elif t == "nca_pair":
            losses = -F.logsigmoid(beta * lc) - 0.5 * F.logsigmoid(-beta * lc) - 0.5 * F.logsigmoid(-beta * lr)
        elif t == "robust":
            z = beta * d
            losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
        elif t == "bco_pair":
            losses = -F.logsigmoid(beta * lc) - F.logsigmoid(-beta * lr)
        elif t == "sppo_hard":
            losses = (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                x = (
                    torch.sort(policy_chosen_logp - policy_rejected_logp, dim=0).values
                    - torch.sort(ref_c - ref_r).values
                )
            else:
                x = torch.sort(lc, dim=0).values - torch.sort(lr, dim=0).values
            losses = -(1 - ls) * F.logsigmoid(beta * x) - ls * F.logsigmoid(-beta * x)
        elif t == "apo_zero":
            losses = 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)
        elif t == "apo_down":
            losses = torch.sigmoid(beta * lc) + 1 - torch.sigmoid(beta * (lc - lr))
        elif t == "discopop":
            z = beta * d
            m = torch.sigmoid(z / discopop_tau)
            losses = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        elif t == "sft":
            losses = (-policy_chosen_logp.sum() / n_c.sum()).expand_as(lc)
        else:  # "sigmoid_norm"
            losses = -F.logsigmoid(beta * (sc / n_c - sr / n_r))
        total = total + w * losses
    chosen_rewards = beta * lc.detach()
    rejected_rewards = beta * lr.detach()
    return _reduce(total, reduction), chosen_rewards, rejected_rewards


def _flatten_scores(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    check_float(fn, name, x, ndim=(1, 2))
    if x.dim() == 2:
        if x.shape[1] != 1:
            raise ValueError(f"{fn}: `{name}` must be (B,) or (B, 1) scalar rewards, got shape {tuple(x.shape)}.")
        x = x[:, 0]  # (B,)
    return x


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry reward-model loss ``-logsigmoid(r_c - r_r - margin)``, and the pairwise accuracy.

    Matches TRL's ``RewardTrainer``: optional per-pair ``margin`` (the dataset's ``"margin"`` column) and optional
    ``center_rewards_coef * mean((r_c + r_r)^2)`` (Eisenstein et al. 2023) that keeps rewards centred on 0.

    Args:
        r_chosen: ``(B,)`` or ``(B, 1)`` scalar rewards of the chosen responses.
        r_rejected: same shape, the rejected responses.
        margin: optional ``(B,)`` tensor or float: the required reward gap.
        center_rewards_coef: optional weight of the centring term (only with ``reduction="mean"``).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, accuracy)``: ``accuracy`` is the detached fraction of pairs with ``r_c > r_r`` (ties count as
        wrong, as in TRL), ignoring the margin.
    """
    fn = "bradley_terry_loss"
    rc = _flatten_scores(fn, "r_chosen", r_chosen)
    rr = _flatten_scores(fn, "r_rejected", r_rejected)
    check_same_shape(fn, r_chosen=rc, r_rejected=rr)
    check_finite(fn, "r_chosen", rc)
    check_finite(fn, "r_rejected", rr)
    check_choice(fn, "reduction", reduction, _REDUCTIONS)
    diff = rc - rr
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            check_float(fn, "margin", margin, ndim=(0, 1))
            if margin.dim() == 1 and margin.shape != rc.shape:
                raise ValueError(f"{fn}: `margin` must be a scalar or {tuple(rc.shape)}, got {tuple(margin.shape)}.")
            check_finite(fn, "margin", margin)
            diff = diff - margin.to(diff.dtype)
        else:
            diff = diff - check_range(fn, "margin", margin)
    loss = _reduce(-F.logsigmoid(diff), reduction)
    if center_rewards_coef is not None:
        if reduction != "mean":
            raise ValueError(f"{fn}: `center_rewards_coef` needs reduction='mean', got {reduction!r}.")
        coef = check_range(fn, "center_rewards_coef", center_rewards_coef, 0.0, None)
        loss = loss + coef * (rc + rr).square().mean()
    with torch.no_grad():
        accuracy = (rc > rr).to(rc.dtype).mean()
    return loss, accuracy
