"""Turn model outputs into one confidence per instance, the way HELM does (plain torch).

* Multiple choice, scored per choice: softmax over the choices' log-probabilities (optionally divided by their
  lengths), confidence = the largest probability, prediction = its index.
* Generation: confidence = ``exp(sum of the generated answer's token log-probabilities)``.

Notation:
    N: instances, C: choices per instance, T: generated tokens per instance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_llm.metrics.functional._checks import _check_float, _check_logprobs_mask, _check_tensor


def multiple_choice_confidence(
    choice_logprobs: Tensor, choice_lengths: Tensor | None = None, length_normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Confidence and predicted choice from per-choice log-probabilities.

    Args:
        choice_logprobs: ``(N, C)`` (or ``(C,)`` for one instance) summed log-probability of each choice's tokens.
            ``-inf`` marks a missing choice (instances with fewer than C choices); every row needs one finite value.
        choice_lengths: ``(N, C)`` positive lengths (tokens, characters or bytes: your choice of unit) used when
            ``length_normalize`` is True.
        length_normalize: divide each log-probability by its length before the softmax.

    Returns:
        ``(confidence, predicted)``: ``(N,)`` float64 max softmax probability and ``(N,)`` int64 argmax
        (the first maximal choice on ties).

    Example:
        >>> import math, torch
        >>> lp = torch.tensor([[math.log(0.2), math.log(0.6), math.log(0.2)]])
        >>> conf, pred = multiple_choice_confidence(lp)
        >>> round(conf.item(), 6), pred.item()
        (0.6, 1)
    """
    lp = _check_tensor("choice_logprobs", choice_logprobs)
    _check_float("choice_logprobs", lp)
    if lp.ndim == 1:
        lp = lp.unsqueeze(0)  # (1, C)
    if lp.ndim != 2 or lp.shape[1] == 0:
        raise ValueError(
            f"`choice_logprobs` must have shape (N, C) with C >= 1 choices, received {tuple(choice_logprobs.shape)}."
            " Fix: stack one summed log-probability per choice, padding missing choices with -inf."
        )
    lp = lp.detach().to(torch.float64)
    if bool(torch.isnan(lp).any()) or bool((lp == float("inf")).any()):
        raise ValueError("`choice_logprobs` contains NaN or +inf. Expected log-probabilities <= 0 (-inf for padding).")
    if lp.shape[0] and not bool(torch.isfinite(lp).any(dim=1).all()):
        raise ValueError("Every row of `choice_logprobs` needs at least one finite value, received a row of all -inf.")
    if length_normalize:
        if choice_lengths is None:
            raise ValueError(
                "`length_normalize=True` needs `choice_lengths` (N, C), received None. Fix: pass the token (or byte)"
                " length of every choice."
            )
        lengths = _check_tensor("choice_lengths", choice_lengths).reshape(lp.shape).to(torch.float64)
        if not bool((lengths > 0).all()):
            raise ValueError("`choice_lengths` must be > 0 for every choice. Fix: use length 1 for padded choices.")
        lp = lp / lengths
    elif choice_lengths is not None:
        raise ValueError("`choice_lengths` was given but `length_normalize=False`. Fix: pass length_normalize=True.")
    probs = torch.softmax(lp, dim=1)  # (N, C)
    conf, pred = probs.max(dim=1)
    return conf, pred


def generation_confidence(token_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Confidence of generated answers: ``exp(sum of token log-probabilities)`` per row, float64.

    Args:
        token_logprobs: ``(N, T)`` (or ``(T,)``) log-probabilities of the generated tokens.
        mask: same shape, ``True`` for the answer's tokens; ``None`` uses all.

    Example:
        >>> import math, torch
        >>> generation_confidence(torch.tensor([[math.log(0.5), math.log(0.5), 0.0]]), torch.tensor([[1, 1, 0]]))
        tensor([0.2500], dtype=torch.float64)
    """
    lp = _check_tensor("token_logprobs", token_logprobs)
    if lp.ndim == 1:
        lp = lp.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if lp.ndim != 2:
        raise ValueError(f"`token_logprobs` must have shape (N, T), received {tuple(token_logprobs.shape)}.")
    lp, mask = _check_logprobs_mask(lp, mask, name="token_logprobs", allow_neg_inf=True)
    return torch.exp(torch.where(mask, lp.detach().to(torch.float64), 0.0).sum(dim=1))
