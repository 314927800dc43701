"""Token log-probabilities and entropies from logits, in float32 and in chunks (memory-friendly for large vocabularies).

Notation: B batch (rows), T token positions, V vocabulary size, ``tokens`` the token ids being scored, ``mask`` True
on the tokens that count (the response).

Alignment: ``logits[:, t]`` is the distribution that scored ``tokens[:, t]``. For a causal LM whose forward pass
returns logits for ``input_ids`` (``(B, L, V)``), pass ``logits[:, :-1]`` with ``tokens = input_ids[:, 1:]`` and
``mask = response_mask[:, 1:]``.

Temperature: PPO must rescore the sampled tokens with the temperature used for sampling, otherwise the
log-probabilities are not those of the behaviour policy and KL estimates go negative.

Padding: ``tokens`` at masked positions are never read and those positions get exactly 0 and no gradient, so garbage
(NaN logits, or the ``-100`` ignore index) at padding changes no output and sends no NaN gradient back.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_llm.ops import IGNORE_INDEX, token_logprobs
from lightning_llm.rlhf._validation import check_float, check_mask, check_range, check_tensor
from lightning_llm.rlhf.stats import masked_mean


def _check_logits_tokens(
    fn: str, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, float]:
    check_float(fn, "logits", logits, ndim=3)
    check_tensor(fn, "tokens", tokens, ndim=2)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{fn}: `tokens` must be an integer tensor of token ids, got dtype {tokens.dtype}.")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"{fn}: `tokens` must have shape (B, T) = {tuple(logits.shape[:2])} to match `logits` (B, T, V) = "
            f"{tuple(logits.shape)}, got {tuple(tokens.shape)}. For a causal LM pass logits[:, :-1] and "
            "input_ids[:, 1:]."
        )
    mask = (
        torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if mask is None
        else check_mask(fn, mask, tokens.shape)
    )
    temperature = check_range(fn, "temperature", temperature, 0.0, None, low_inclusive=False)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: `chunk_size` must be a positive integer, got {chunk_size!r}.")
    vocab = logits.shape[-1]
    bad = mask & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{fn}: `tokens` holds ids outside [0, {vocab}) on valid positions (first at {idx}: "
            f"{int(tokens[tuple(idx)])}). Check that the tokenizer matches the model's vocabulary, and that "
            "ignore indices such as -100 are masked out."
        )
    return mask, temperature


def sequence_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 8,
) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(logits / temperature)[tokens]``, computed in float32.

    Computed by :func:`lightning_llm.ops.token_logprobs`: rows are processed ``chunk_size`` at a time, so the float32
    copy of the logits never exceeds ``chunk_size * T * V`` elements (the full softmax is never materialised in half
    precision, where it is inexact). Differentiable with respect to ``logits``; the backward recomputes each chunk's
    softmax instead of storing a float32 copy of all logits.

    Args:
        logits: ``(B, T, V)``; ``logits[:, t]`` scores ``tokens[:, t]`` (see the module docstring for the shift).
        tokens: ``(B, T)`` integer token ids; ids at masked positions are ignored (may be -100).
        mask: ``(B, T)`` True on the tokens to score; ``None`` scores every token.
        temperature: divide the logits by this (> 0) before the softmax; use the sampling temperature.
        chunk_size: rows per chunk.

    Returns:
        ``(B, T)`` float32 log-probabilities, exactly 0 on masked positions.
    """
    fn = "sequence_logprobs"
    mask, temperature = _check_logits_tokens(fn, logits, tokens, mask, temperature, chunk_size)
    targets = torch.where(mask, tokens, IGNORE_INDEX)  # (B, T) masked positions are never read
    rows = chunk_size * max(logits.shape[1], 1)  # chunk_size sequences of T positions
    return token_logprobs(logits, targets, IGNORE_INDEX, temperature, chunk_size=rows).float()  # (B, T)


def sequence_logprob_sum(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Summed log-probability of each row's valid tokens, ``(B,)`` float32 -- the sequence log-likelihood DPO uses.

    Same arguments as :func:`sequence_logprobs`. For length-normalised variants (e.g. IPO as TRL computes it),
    divide by ``mask.sum(1)``.
    """
    return sequence_logprobs(*args, **kwargs).sum(dim=-1)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits / temperature)`` along the last axis, in float32.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, which never forms ``log(softmax)`` of tiny probabilities
    (``0 * -inf`` cannot occur). The leading dimensions are flattened and processed ``chunk_size`` rows at a time.

    Args:
        logits: ``(..., V)``.
        temperature: > 0.
        chunk_size: rows (positions) per chunk.
        mask: optional ``logits.shape[:-1]`` bool; positions where it is False are not read and get entropy 0.

    Returns:
        ``logits.shape[:-1]`` float32 entropies.
    """
    fn = "entropy_from_logits"
    check_float(fn, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: `logits` needs a non-empty last (vocabulary) axis, got shape {tuple(logits.shape)}.")
    temperature = check_range(fn, "temperature", temperature, 0.0, None, low_inclusive=False)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: `chunk_size` must be a positive integer, got {chunk_size!r}.")
    if mask is not None:
        mask = check_mask(fn, mask, logits.shape[:-1])
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_mask = None if mask is None else mask.reshape(-1)  # (N,)
    out = []
    for i, chunk in enumerate(flat.split(chunk_size, dim=0)):
        z = chunk.float()
        m = None if flat_mask is None else flat_mask[i * chunk_size : i * chunk_size + z.shape[0]]  # (n,)
        if m is not None:
            z = torch.where(m[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        out.append(ent if m is None else torch.where(m, ent, torch.zeros((), dtype=ent.dtype, device=ent.device)))
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])


def masked_entropy(
    logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Mean entropy over valid tokens only (never over padding): ``masked_mean(entropy_from_logits(logits), mask)``.

    Args:
        logits: ``(B, T, V)`` (any ``(..., V)``).
        mask: ``logits.shape[:-1]``, True on valid tokens.
        temperature: > 0; the sampling temperature gives the entropy of the sampling distribution.
        chunk_size: rows per chunk.

    Returns:
        Scalar float32 (``NaN`` if no token is valid).
    """
    fn = "masked_entropy"
    check_float(fn, "logits", logits)
    mask = check_mask(fn, mask, logits.shape[:-1])
    return masked_mean(entropy_from_logits(logits, temperature=temperature, chunk_size=chunk_size, mask=mask), mask)
