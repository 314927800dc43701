"""RLHF losses: PPO's clipped policy and value losses, DPO / IPO, and the Bradley-Terry reward-model loss.

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

import torch
import torch.nn.functional as F

from lightning_llm.rlhf._validation import (
    check_choice,
    check_finite,
    check_float,
    check_mask,
    check_range,
    check_same_shape,
)
from lightning_llm.rlhf.stats import masked_mean


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, ``masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    Args:
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the current policy (with gradient).
        old_logp: ``(B, T)`` the same under the policy that sampled them (detached).
        advantages: ``(B, T)`` per-token advantages (e.g. whitened GAE), or ``(B,)`` one per sequence (GRPO /
            RLOO), broadcast over the tokens. Detached.
        mask: ``(B, T)`` True on response tokens.
        clip_eps: clip range ``eps`` > 0 (default 0.2).
        clip_eps_high: upper clip range if different ("clip-higher", DAPO); default ``clip_eps``.

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of detached scalars, all masked means over valid tokens:

        * ``clipfrac``: fraction of tokens where the clipped term is the active one (``-A*clip(ratio) > -A*ratio``,
          TRL's definition);
        * ``approx_kl``: the k3 estimate of ``KL(old || new)``, ``(ratio - 1) - log(ratio)`` -- unbiased because
          the tokens were sampled from the old policy, and >= 0 (not the ``0.5 * logr^2`` k2 variant);
        * ``ratio_mean`` and ``ratio_max``: of ``ratio`` over valid tokens.
    """
    fn = "policy_loss"
    check_float(fn, "logp", logp, ndim=2)
    check_float(fn, "old_logp", old_logp, ndim=2)
    check_float(fn, "advantages", advantages, ndim=(1, 2))
    check_same_shape(fn, logp=logp, old_logp=old_logp)
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(
                f"{fn}: 1-D `advantages` must have one entry per row of `logp` ({logp.shape[0]}), "
                f"got shape {tuple(advantages.shape)}."
            )
        advantages = advantages[:, None].expand_as(logp)  # (B, T)
    check_same_shape(fn, logp=logp, advantages=advantages)
    mask = check_mask(fn, mask, logp.shape)
    eps_low = check_range(fn, "clip_eps", clip_eps, 0.0, None, low_inclusive=False)
    eps_high = eps_low if clip_eps_high is None else check_range(fn, "clip_eps_high", clip_eps_high, 0.0, None, False)
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


DPO_LOSS_TYPES = ("sigmoid", "ipo")
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation loss (Rafailov et al. 2023) and its IPO variant (Azar et al. 2023), as TRL.

    With ``h = (logp_c - ref_c) - (logp_r - ref_r)`` (sequence log-probabilities summed over response tokens):

    * ``"sigmoid"`` (DPO): ``-(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)``; with
      ``label_smoothing = ls = 0`` this is ``-logsigmoid(beta * h)``, TRL's ``"sigmoid"``; ``ls > 0`` is
      conservative DPO (cDPO), TRL's former ``"sigmoid"`` with ``label_smoothing``.
    * ``"ipo"``: ``(h - 1 / (2 * beta))^2``. TRL (every version) feeds IPO *length-averaged* log-probabilities:
      pass ``chosen_lengths`` / ``rejected_lengths`` (response token counts) to divide each log-ratio by its length,
      or pass already averaged log-probabilities and no lengths.

    Args:
        policy_chosen_logp: ``(B,)`` policy log-probability of each chosen response (e.g.
            :func:`~lightning_llm.rlhf.logprobs.sequence_logprob_sum`), with gradient.
        policy_rejected_logp: ``(B,)`` same for the rejected response.
        ref_chosen_logp: ``(B,)`` reference model's, for the chosen response (detached).
        ref_rejected_logp: ``(B,)`` reference model's, for the rejected response (detached).
        beta: > 0, strength of the implicit KL regularisation (default 0.1, TRL's).
        loss_type: ``"sigmoid"`` or ``"ipo"``.
        label_smoothing: in [0, 0.5), the assumed probability that a preference label is flipped (sigmoid only).
        chosen_lengths: optional ``(B,)`` response token counts for IPO's length normalisation.
        rejected_lengths: optional ``(B,)``, the same for the rejected responses.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-pair losses).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``; the rewards are the detached implicit rewards
        ``beta * (logp - ref_logp)`` (``(B,)``, unnormalised, as TRL logs them). Their difference is the reward
        margin, and ``(chosen_rewards > rejected_rewards).float().mean()`` the preference accuracy.
    """
    fn = "dpo_loss"
    names = ("policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp")
    tensors = (policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    for name, t in zip(names, tensors):
        check_float(fn, name, t, ndim=1)
        check_finite(fn, name, t)
    check_same_shape(fn, **dict(zip(names, tensors)))
    beta = check_range(fn, "beta", beta, 0.0, None, low_inclusive=False)
    check_choice(fn, "loss_type", loss_type, DPO_LOSS_TYPES)
    check_choice(fn, "reduction", reduction, _REDUCTIONS)
    label_smoothing = check_range(fn, "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError(
            f"{fn}: `label_smoothing` applies to loss_type='sigmoid' only, got {label_smoothing} with 'ipo'."
        )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{fn}: pass both `chosen_lengths` and `rejected_lengths`, or neither.")
    if chosen_lengths is not None and loss_type != "ipo":
        raise ValueError(
            f"{fn}: `chosen_lengths` / `rejected_lengths` are IPO's length normalisation; DPO ('sigmoid') uses "
            "summed log-probabilities. Drop them or use loss_type='ipo'."
        )

    chosen_logratios = policy_chosen_logp - ref_chosen_logp.detach()  # (B,)
    rejected_logratios = policy_rejected_logp - ref_rejected_logp.detach()  # (B,)
    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        if chosen_lengths is not None:
            for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
                if not isinstance(t, torch.Tensor) or t.shape != chosen_logratios.shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{fn}: `{name}` must be a {tuple(chosen_logratios.shape)} tensor, got {got}.")
            h = chosen_logratios / chosen_lengths.clamp(min=1).to(chosen_logratios.dtype) - rejected_logratios / (
                rejected_lengths.clamp(min=1).to(rejected_logratios.dtype)
            )
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1.0 / (2.0 * beta)).square()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return _reduce(losses, reduction), chosen_rewards, rejected_rewards


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
