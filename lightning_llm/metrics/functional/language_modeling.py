"""Perplexity and bits-per-byte from logits or per-token log-probabilities (plain torch).

Perplexity is ``exp(sum of token NLL / number of scored tokens)`` with the natural log; bits per byte is
``sum of token NLL / (ln 2 * number of UTF-8 bytes)``, which compares models with different tokenizers.

How it is computed (and why it differs from ``torchmetrics.functional.text.perplexity``): the token
log-probabilities come from :func:`lightning_llm.ops.token_logprobs`, a log-softmax (never softmax-then-log, which
underflows to ``log(0) = -inf`` once a logit gap exceeds ~104 in float32 or ~17 in float16) in float32 (float64 kept),
over the flattened ``B*T`` rows in chunks of a byte budget (``chunk_bytes``; default 8 MiB on CPU, 256 MiB elsewhere,
see :func:`lightning_llm.ops.chunk_rows`), each chunk upcast into one reused buffer, so no second full-size float32
copy of the logits is ever made (torchmetrics materialises a full softmax), and differentiable without storing one.
The NLL sum is taken in float64 and the token count in int64, exact far past 2^24 tokens.

Notation:
    B: batch size, T: sequence length, V: vocabulary size, N = B*T flattened rows, K: rows in one chunk.
    NLL: negative log-likelihood in nats, ``-log p(target | context)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_llm.metrics.functional._checks import (
    _check_ignore_index,
    _check_logits_target,
    _check_logprobs_mask,
    _check_target_range,
    _check_tensor,
)
from lightning_llm.ops import IGNORE_INDEX, chunk_rows, compute_dtype, token_logprobs


def token_nll(
    logits: Tensor,
    target: Tensor,
    ignore_index: int | None = None,
    chunk_bytes: int | None = None,
    validate_args: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood, chunked over the flattened rows.

    Args:
        logits: ``(B, T, V)`` unnormalised scores, any float dtype.
        target: ``(B, T)`` token ids, already aligned (``target[b, t]`` is predicted from position ``t``).
        ignore_index: target value that marks positions not to score (e.g. ``-100``); ``None`` scores every position.
        chunk_bytes: byte budget of one float32 chunk; ``None`` picks the device default (see module docstring).
        validate_args: check target range and non-finite results (one host sync); ``False`` skips the checks
            (out-of-vocabulary ids are then silently not scored).

    Returns:
        ``(nll, valid)``: ``nll`` is ``(B, T)`` in float32 (float64 for float64 logits), 0 where ignored;
        ``valid`` is the ``(B, T)`` bool mask of scored positions.
    """
    _check_ignore_index(ignore_index)
    logits, target = _check_logits_target(logits, target)
    B, T, V = logits.shape
    flat_target = target.reshape(B * T)  # (N,)
    valid = flat_target != ignore_index if ignore_index is not None else torch.ones_like(flat_target, dtype=torch.bool)
    in_vocab = (flat_target >= 0) & (flat_target < V)
    scored = valid & in_vocab
    # Unscored (and, until the check below, out-of-vocabulary) positions get the internal IGNORE_INDEX, so any user
    # ignore_index (even one inside [0, V)) works and a bad id cannot crash the kernel before our error message.
    rows = chunk_rows(V, logits.device, chunk_bytes, torch.finfo(compute_dtype(logits.dtype)).bits // 8)
    logp = token_logprobs(logits, torch.where(scored, flat_target, IGNORE_INDEX).view(B, T), chunk_size=rows)
    nll = torch.where(scored, -logp.view(B * T), 0.0)  # (N,)
    if not validate_args or B * T == 0:
        return nll.view(B, T), scored.view(B, T)
    # one host sync for both checks
    bad_target, bad_value = torch.stack([(valid & ~in_vocab).any(), ~torch.isfinite(nll).all()]).tolist()
    if bad_target:
        _check_target_range(flat_target, valid, V, ignore_index)
    if bad_value:
        raise ValueError(
            "`logits` produced a non-finite log-probability at a scored position: the row contains NaN or +inf, or"
            " the target token's logit is -inf. Expected finite logits (-inf is allowed only for non-target entries)."
            " Fix: check the model for overflow (e.g. run it in bfloat16/float32 instead of float16) and mark padding"
            " with ignore_index."
        )
    return nll.view(B, T), scored.view(B, T)


def _perplexity_update(logits: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Return ``(nll_sum, count)``: the float64 NLL sum (nats) and the int64 number of scored tokens.

    Further arguments are those of :func:`token_nll` (``ignore_index``, ``chunk_bytes``, ``validate_args``).
    """
    nll, valid = token_nll(logits, target, *args, **kwargs)
    return nll.sum(dtype=torch.float64), valid.sum(dtype=torch.int64)


def _perplexity_from_logprobs_update(
    logprobs: Tensor, mask: Tensor | None = None, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    """Return ``(nll_sum, count)`` from per-token log-probabilities and a mask of scored tokens."""
    logprobs, mask = _check_logprobs_mask(logprobs, mask, validate_args)
    nll_sum = -torch.where(mask, logprobs.to(torch.float64), 0.0).sum()
    return nll_sum, mask.sum(dtype=torch.int64)


def _perplexity_compute(nll_sum: Tensor, count: Tensor) -> Tensor:
    """``exp(nll_sum / count)`` in float64; raises if nothing was scored."""
    if int(count) == 0:
        raise ValueError(
            "Perplexity of zero scored tokens is undefined: received count = 0. Fix: call update() with at least one"
            " position whose target is not ignore_index (or mask=True) before compute()."
        )
    return torch.exp(nll_sum.to(torch.float64) / count)


def perplexity(
    logits: Tensor,
    target: Tensor,
    ignore_index: int | None = None,
    chunk_bytes: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    """Perplexity ``exp(mean NLL over scored tokens)`` from logits, computed exactly and in chunks.

    Args:
        logits: ``(B, T, V)`` unnormalised scores in any float dtype (computed in float32, float64 kept).
        target: ``(B, T)`` integer token ids aligned with ``logits``.
        ignore_index: target value excluded from the score (e.g. ``-100``); ``None`` scores every position.
        chunk_bytes: byte budget of one float32 chunk of rows; ``None``: 8 MiB on CPU, 256 MiB elsewhere.
        validate_args: check target range and finiteness (one host sync per call).

    Returns:
        A float64 scalar tensor.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 4, 10)  # uniform over 10 tokens
        >>> target = torch.tensor([[1, 2, 3, -100]])
        >>> perplexity(logits, target, ignore_index=-100)
        tensor(10.0000, dtype=torch.float64)
        >>> logits[0, 0, 1] = 1000.0  # a gap where softmax-then-log gives inf; here token 1 costs ~0 nats
        >>> round(perplexity(logits, target, ignore_index=-100).item(), 4)  # exp((0 + 2 ln 10) / 3)
        4.6416
    """
    nll_sum, count = _perplexity_update(logits, target, ignore_index, chunk_bytes, validate_args)
    return _perplexity_compute(nll_sum, count)


def perplexity_from_logprobs(logprobs: Tensor, mask: Tensor | None = None, validate_args: bool = True) -> Tensor:
    """Perplexity from per-token log-probabilities computed elsewhere (e.g. by a scoring server).

    Args:
        logprobs: per-token natural-log probabilities of the observed tokens, any shape (typically ``(B, T)``).
        mask: bool tensor of the same shape, ``True`` where the token is scored; ``None`` scores all.
        validate_args: check finiteness and ``logprobs <= 0`` at scored positions.

    Returns:
        A float64 scalar tensor ``exp(-sum(logprobs[mask]) / mask.sum())``.

    Example:
        >>> import math, torch
        >>> lp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
        >>> perplexity_from_logprobs(lp, mask=torch.tensor([[True, True, False]]))  # exp(ln(8) / 2) = sqrt(8)
        tensor(2.8284, dtype=torch.float64)
    """
    nll_sum, count = _perplexity_from_logprobs_update(logprobs, mask, validate_args)
    return _perplexity_compute(nll_sum, count)


def _check_num_bytes(num_bytes: object, batch_size: int | None = None) -> Tensor:
    """``num_bytes``: int, scalar or ``(B,)`` integer tensor of UTF-8 bytes; returns an int64 scalar (the sum)."""
    if isinstance(num_bytes, bool):
        raise TypeError("`num_bytes` must be an int or an integer tensor, received a bool.")
    if isinstance(num_bytes, int):
        num_bytes = torch.tensor(num_bytes, dtype=torch.int64)
    num_bytes = _check_tensor("num_bytes", num_bytes)
    if num_bytes.is_floating_point() or num_bytes.dtype == torch.bool or num_bytes.is_complex():
        raise TypeError(
            f"`num_bytes` must be an integer count of UTF-8 bytes, received dtype {num_bytes.dtype}."
            " Fix: pass `len(text.encode('utf-8'))` summed over the scored tokens (int or int64 tensor)."
        )
    if num_bytes.ndim > 1 or (num_bytes.ndim == 1 and batch_size is not None and num_bytes.numel() != batch_size):
        raise ValueError(
            f"`num_bytes` must be a scalar (total) or a (B,) tensor with one count per row (B={batch_size}), received"
            f" shape {tuple(num_bytes.shape)}. Fix: pass the total number of UTF-8 bytes the scored tokens cover."
        )
    if num_bytes.numel() and int(num_bytes.min()) < 0:
        raise ValueError(f"`num_bytes` must be >= 0, received {num_bytes.tolist()}.")
    return num_bytes.sum(dtype=torch.int64)


def _bits_per_byte_compute(nll_sum: Tensor, num_bytes: Tensor) -> Tensor:
    if int(num_bytes) == 0:
        raise ValueError(
            "Bits per byte of zero bytes is undefined: received num_bytes = 0. Fix: call update() with the number of"
            " UTF-8 bytes covered by the scored tokens (> 0) before compute()."
        )
    return nll_sum.to(torch.float64) / (math.log(2.0) * num_bytes.to(torch.float64))


def bits_per_byte(nll_sum: Tensor | float, n_bytes: Tensor | int) -> Tensor:
    """Bits per UTF-8 byte: ``nll_sum / (ln 2 * n_bytes)``.

    Args:
        nll_sum: total negative log-likelihood in nats of the scored tokens (e.g. from :func:`token_nll`).
        n_bytes: total number of UTF-8 bytes those tokens cover (``len(text.encode("utf-8"))``).

    Returns:
        A float64 scalar tensor.

    Example:
        >>> import math, torch
        >>> bits_per_byte(torch.tensor(8 * math.log(2.0), dtype=torch.float64), 4)  # 8 bits over 4 bytes
        tensor(2., dtype=torch.float64)
    """
    if not isinstance(nll_sum, Tensor):
        nll_sum = torch.tensor(float(nll_sum), dtype=torch.float64)
    if nll_sum.numel() != 1:
        raise ValueError(f"`nll_sum` must be a scalar (the summed NLL), received shape {tuple(nll_sum.shape)}.")
    return _bits_per_byte_compute(nll_sum.reshape(()), _check_num_bytes(n_bytes))
