"""The few pure-torch kernels every layer shares: token log-probabilities, chunked over rows (imports only torch).

``nn`` (generation, the fused loss), ``metrics`` (perplexity, LAMBADA), ``rlhf`` (policy log-probabilities),
``evaluation`` and ``callbacks`` all score tokens with :func:`token_logprobs`; none re-derives the log-softmax.

Notation: N rows (every leading dimension and T flattened), V vocabulary, K rows in one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Target value of positions that are not scored (PyTorch's ``cross_entropy`` and Hugging Face's convention)."""

DEFAULT_CHUNK_BYTES_CPU = 8 * 1024**2
DEFAULT_CHUNK_BYTES_ACCELERATOR = 256 * 1024**2


def is_plain(t: Tensor | None) -> bool:
    """A dense tensor or Parameter (or None), not a DTensor or another subclass, which take the generic autograd path."""
    return t is None or type(t) in (Tensor, torch.nn.Parameter)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(vocab_size: int, device: torch.device, chunk_bytes: int | None = None, itemsize: int = 4) -> int:
    """Rows per chunk so that one ``(K, V)`` chunk of ``itemsize``-byte floats takes at most ``chunk_bytes``.

    ``chunk_bytes=None`` means 8 MiB on CPU (the chunk and its log-softmax stay in the L2/L3 cache and the same small
    blocks are reused; measured fastest between 2 and 16 MiB for V = 32000 and 50304 on a 2-core x86 CPU) and 256 MiB
    elsewhere (enough to keep a GPU busy, small next to the logits of a real model). At least one row.
    """
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES_CPU if device.type == "cpu" else DEFAULT_CHUNK_BYTES_ACCELERATOR
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"`chunk_bytes` must be None or a positive int (bytes), received {chunk_bytes!r}.")
    return max(1, chunk_bytes // (max(vocab_size, 1) * itemsize))


def row_chunks(logits: Tensor, rows: int) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(flat_start, chunk)``: ``chunk`` a ``(k <= rows, V)`` view of consecutive flattened rows of ``logits``.

    Never copies when the leading dimensions merge into one: when ``(..., T, V)`` cannot be viewed as ``(N, V)``
    (e.g. ``logits[:, :-1]`` or a transposed tensor), chunks are taken along T inside each sequence.
    """
    v = logits.shape[-1]
    try:
        flat = logits.view(-1, v)  # (N, V)
    except RuntimeError:
        t = logits.shape[-2]
        seqs = logits.reshape(-1, t, v)  # (M, T, V), a view unless the leading dimensions cannot merge
        for m in range(seqs.shape[0]):
            for start in range(0, t, rows):
                yield m * t + start, seqs[m, start : start + rows]  # (k, V)
        return
    for start in range(0, flat.shape[0], rows):
        yield start, flat[start : start + rows]  # (k, V)


def log_softmax_gather(z: Tensor, targets: Tensor, out: Tensor | None = None) -> Tensor:
    """``log_softmax(z)[i, targets[i]]`` of a ``(K, V)`` float chunk: ``(K,)``.

    The whole log-softmax is written into ``out`` when given (a reused buffer, or ``z`` itself to work in place, as
    the fused loss in ``nn/heads.py`` does before turning it into the softmax with ``exp_``).
    """
    logp = torch.log_softmax(z, dim=-1) if out is None else torch.log_softmax(z, dim=-1, out=out)  # (K, V)
    return logp.gather(1, targets[:, None]).squeeze(1)


def _forward(logits: Tensor, safe: Tensor, temperature: float, rows: int, dtype: torch.dtype) -> Tensor:
    """``(N,)`` log-probabilities at ``safe`` targets: one ``(K, V)`` upcast buffer and one log-softmax buffer."""
    n = safe.numel()
    out = torch.empty(n, dtype=dtype, device=logits.device)  # (N,)
    if n == 0:
        return out
    buf = torch.empty(min(rows, n), logits.shape[-1], dtype=dtype, device=logits.device)  # (K, V) log-softmax
    up = None if logits.dtype == dtype and temperature == 1.0 else torch.empty_like(buf)  # (K, V) scaled copy
    for start, chunk in row_chunks(logits, rows):
        k = chunk.shape[0]
        src = chunk if up is None else up[:k].copy_(chunk)
        if temperature != 1.0:
            src.div_(temperature)
        out[start : start + k] = log_softmax_gather(src, safe[start : start + k], out=buf[:k])
    return out


class _TokenLogprobs(torch.autograd.Function):
    """Chunked log-probabilities whose backward recomputes each chunk's softmax instead of storing it.

    ``d logp_i / d z_i = onehot(t_i) - softmax(z_i)`` (divided by the temperature), so the backward needs only the
    logits it already holds: autograd through ``log_softmax`` would keep a float32 ``(N, V)`` copy alive instead.
    """

    @staticmethod
    def forward(ctx, logits, safe, valid, temperature: float, rows: int):  # noqa: D102
        dtype = compute_dtype(logits.dtype)
        out = _forward(logits, safe, temperature, rows, dtype)
        ctx.save_for_backward(logits, safe, valid)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        logits, safe, valid = ctx.saved_tensors
        g = torch.where(valid, grad_out.to(ctx.dtype), 0.0)  # (N,) nothing flows into ignored rows
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_flat = grad.view(-1, logits.shape[-1])  # (N, V)
        for start, chunk in row_chunks(logits, ctx.rows):
            k = chunk.shape[0]
            d = torch.softmax(chunk.to(ctx.dtype) / ctx.temperature, dim=-1)  # (k, V)
            gk = g[start : start + k, None]  # (k, 1)
            d.mul_(-gk).scatter_add_(1, safe[start : start + k, None], gk)  # g * (onehot - softmax)
            d.masked_fill_(~valid[start : start + k, None], 0.0)  # NaN logits on ignored rows stay harmless
            grad_flat[start : start + k] = d.div_(ctx.temperature)
        return grad, None, None, None, None


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-probability of each target token, ``log_softmax(logits / temperature)[..., t, targets[..., t]]``.

    Chunking: the ``N`` rows (all leading dimensions and T flattened) are processed ``chunk_size`` at a time; each
    chunk is upcast (float32, or float64 for float64 logits) into one reused ``(K, V)`` buffer and its log-softmax
    written into another, so no full-precision copy of all logits is ever made and no memory is allocated per
    chunk. The default ``chunk_size`` fits one chunk in 8 MiB on CPU (cache-resident) and 256 MiB on accelerators
    (see :func:`chunk_rows`). Logits that cannot be viewed as ``(N, V)`` (e.g. ``logits[:, :-1]``) are chunked along
    T within each sequence, still without a copy. With gradients, a custom backward recomputes each chunk's softmax
    (the gradient is ``onehot - softmax``) rather than storing ``(N, V)`` log-softmax activations; subclassed tensors
    (DTensor) take plain autograd per chunk.

    Args:
        logits: ``(..., T, V)`` unnormalised scores in any float dtype.
        targets: ``(..., T)`` integer token ids aligned with ``logits`` (``targets[..., t]`` is scored by
            ``logits[..., t, :]``); every id that is not ``ignore_index`` must lie in ``[0, V)``.
        ignore_index: target value of positions that are not scored; they get exactly 0 (and no gradient), whatever
            their logits hold (NaN included).
        temperature: divide the logits by this (> 0) before the softmax (PPO rescoring at the sampling temperature).
        chunk_size: rows per chunk; ``None`` picks it from the byte budget above.

    Returns:
        ``(..., T)`` log-probabilities in float32 (float64 for float64 logits), 0 at ignored positions.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
        >>> token_logprobs(logits, torch.tensor([[1, 2, IGNORE_INDEX]]))  # log(1/4) twice, 0 where ignored
        tensor([[-1.3863, -1.3863,  0.0000]])
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise TypeError(
            "`logits` must be a floating-point tensor of shape (..., T, V), received "
            f"{type(logits).__name__ if not isinstance(logits, Tensor) else (logits.dtype, tuple(logits.shape))}."
            " Fix: pass the model's output logits."
        )
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(
            f"`targets` must be an integer tensor of token ids, received {getattr(targets, 'dtype', type(targets))}."
            " Fix: pass token ids as a long tensor."
        )
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"`targets` must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, received"
            f" {tuple(targets.shape)}. Fix: align them (for a causal LM: logits[:, :-1] with input_ids[:, 1:])."
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, received {temperature!r}. Fix: use 1.0 for none.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be None or an int >= 1 (rows), received {chunk_size!r}.")
    dtype = compute_dtype(logits.dtype)
    rows = chunk_size or chunk_rows(logits.shape[-1], logits.device, None, torch.finfo(dtype).bits // 8)
    flat_targets = targets.reshape(-1)  # (N,)
    valid = flat_targets != ignore_index  # (N,)
    safe = torch.where(valid, flat_targets, torch.zeros_like(flat_targets)).long()  # ignored rows read column 0
    temperature = float(temperature)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        out = _forward(logits, safe, temperature, rows, dtype)
    elif is_plain(logits):
        out = _TokenLogprobs.apply(logits, safe, valid, temperature, rows)
    else:  # a tensor subclass: plain autograd, one chunk at a time
        parts = [
            log_softmax_gather(chunk.to(dtype) / temperature, safe[start : start + chunk.shape[0]])
            for start, chunk in row_chunks(logits, rows)
        ]
        out = torch.cat(parts) if parts else logits.new_zeros(0, dtype=dtype)
    return torch.where(valid, out, 0.0).view(targets.shape)
