"""LAMBADA accuracy and perplexity with lm-evaluation-harness's definitions (plain torch).

Each row of the batch is one example. Its target tokens are the positions where ``target != ignore_index``
(``target`` is already aligned: ``target[b, t]`` is the token predicted from position ``t``). As in
lm-evaluation-harness's ``lambada_openai``:

* ``acc``: an example is correct iff the greedy ``argmax`` of the log-softmax equals the target at *every* target
  position;
* ``ppl``: ``exp(-mean over examples of the summed target log-probability)``, per example, not per token.

Log-probabilities come from :func:`lightning_llm.ops.token_logprobs` (float32, float64 for float64 logits), taken over
only the rows that hold target tokens, in chunks, so the cost is independent of the context length.

Notation:
    B: examples (rows), T: sequence length, V: vocabulary size, K: number of target tokens in the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.metrics.functional._checks import _check_ignore_index, _check_logits_target, _check_target_range
from lightning_llm.ops import IGNORE_INDEX, chunk_rows, compute_dtype, token_logprobs


def lambada_update(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_bytes: int | None = None,
    validate_args: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-example greedy correctness and summed target log-probability.

    Args:
        logits: ``(B, T, V)`` model logits, any float dtype.
        target: ``(B, T)`` aligned target ids; every position that is not a target token holds ``ignore_index``.
        ignore_index: marker of non-target positions.
        chunk_bytes: byte budget of one float32 chunk of target rows (see ``language_modeling``).
        validate_args: check target range, that every row has a target token, and finiteness.

    Returns:
        ``(correct, logprob)``: ``(B,)`` bool (all target tokens greedy) and ``(B,)`` float64 summed log-probability.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 3, 4)
        >>> logits[0, 1, 2] = logits[0, 2, 3] = 5.0  # row 0 predicts 2 then 3
        >>> target = torch.tensor([[-100, 2, 3], [-100, -100, 1]])
        >>> correct, logprob = lambada_update(logits, target)
        >>> correct
        tensor([ True, False])
        >>> round(logprob[1].item(), 4)  # uniform over 4 tokens: log(1/4)
        -1.3863
    """
    _check_ignore_index(ignore_index)
    logits, target = _check_logits_target(logits, target)
    B, T, V = logits.shape
    flat_target = target.reshape(B * T)  # (B*T,)
    valid = flat_target != ignore_index
    if validate_args:
        _check_target_range(flat_target, valid, V, ignore_index)
    positions = valid.nonzero().squeeze(1)  # (K,) flat indices of target tokens
    example = torch.div(positions, T, rounding_mode="floor")  # (K,) row of each target token
    n_tokens = torch.bincount(example, minlength=B)  # (B,)
    if validate_args and B and int(n_tokens.min()) == 0:
        empty = (n_tokens == 0).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(
            f"Every row of `target` must hold at least one target token (a value != ignore_index={ignore_index}),"
            f" received rows {empty} with none. Fix: drop empty examples, or check that the continuation was not"
            " truncated away."
        )
    dtype = compute_dtype(logits.dtype)
    flat_logits = logits.reshape(B * T, V)  # (B*T, V), a view for contiguous logits
    tok_target = flat_target[positions]  # (K,)
    token_logprob = torch.empty(positions.numel(), dtype=dtype, device=logits.device)  # (K,)
    token_hit = torch.empty(positions.numel(), dtype=torch.bool, device=logits.device)  # (K,)
    rows = chunk_rows(V, logits.device, chunk_bytes, torch.finfo(dtype).bits // 8)
    for start in range(0, positions.numel(), rows):
        scored = flat_logits.index_select(0, positions[start : start + rows])  # (k, V), only the target rows
        tgt = tok_target[start : start + rows]
        token_logprob[start : start + rows] = token_logprobs(scored, tgt, chunk_size=rows)
        token_hit[start : start + rows] = scored.argmax(dim=-1) == tgt  # argmax of logits = argmax of log-softmax
    if validate_args and positions.numel() and not bool(torch.isfinite(token_logprob).all()):
        raise ValueError(
            "`logits` produced a non-finite log-probability at a target position (NaN/+inf in the row, or -inf at the"
            " target token). Expected finite logits. Fix: check the model for overflow (float16) or bad inputs."
        )
    logprob = torch.zeros(B, dtype=torch.float64, device=logits.device).index_add_(
        0, example, token_logprob.to(torch.float64)
    )
    hits = torch.zeros(B, dtype=torch.int64, device=logits.device).index_add_(0, example, token_hit.long())
    return (hits == n_tokens) & (n_tokens > 0), logprob


def lambada_compute(correct: Tensor, logprob_sum: Tensor, n: Tensor) -> dict[str, Tensor]:
    """``{"acc": correct / n, "ppl": exp(-logprob_sum / n)}`` in float64 from the summed per-example statistics."""
    if int(n) == 0:
        raise ValueError(
            "LAMBADA metrics of zero examples are undefined: received n = 0. Fix: call update() with at least one"
            " example before compute()."
        )
    n64 = n.to(torch.float64)
    return {"acc": correct.to(torch.float64) / n64, "ppl": torch.exp(-logprob_sum.to(torch.float64) / n64)}


def lambada_accuracy(logits: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
    """LAMBADA ``{"acc", "ppl"}`` of one batch (each row one example), lm-evaluation-harness definitions.

    Further arguments are those of :func:`lambada_update` (``ignore_index``, ``chunk_bytes``, ``validate_args``).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 2, 4)
        >>> out = lambada_accuracy(logits, torch.tensor([[-100, 1]]))  # uniform: argmax picks token 0, target is 1
        >>> out["acc"].item(), round(out["ppl"].item(), 4)  # ppl = exp(log 4) = 4
        (0.0, 4.0)
    """
    correct, logprob = lambada_update(logits, target, *args, **kwargs)
    return lambada_compute(correct.sum(), logprob.sum(), torch.tensor(correct.numel()))
