"""Output heads: the next-token loss computed in chunks, and a scalar head for reward and value models.

Notation: N rows (B*T flattened), C width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_llm.ops import IGNORE_INDEX, is_plain, log_softmax_gather


def _chunk_ce(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (n, V) float32 for this chunk only
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _fused_ce(hidden, weight, bias, targets, ignore_index: int, chunk_size: int, need: tuple[bool, bool, bool]):
    """``(summed loss, grad_hidden, grad_weight, grad_bias)``; a gradient is None unless ``need`` asks for it.

    Every chunk's float32 logits are written into one ``(min(chunk_size, N), V)`` buffer allocated once, and the
    gradients are accumulated in place (``addmm_``, ``mm(out=)``), so the loop allocates no ``(n, V)`` or ``(V, C)``
    block after the first: a new buffer per chunk would leave the previous one alive while the next is computed (two
    chunks at once) and, for a trainable output layer, a ``(V, C)`` product per chunk before it is added.
    """
    need_h, need_w, need_b = need
    n, vocab = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index  # (N,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # (N,) ignored rows point at class 0
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    # float32 weights and hidden states: matmuls straight into / onto the float32 buffers
    direct = hidden.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    buf = torch.empty(min(chunk_size, n), vocab, dtype=torch.float32, device=hidden.device)  # (chunk, V), reused
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        h, t, v = hidden[sl], safe[sl], valid[sl]
        logits = buf[: h.shape[0]]  # (n, V)
        if not direct:
            logits.copy_(F.linear(h, weight, bias))  # the product in the weights' dtype, upcast
        elif bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        logp = log_softmax_gather(logits, t, out=logits)  # (n,); ``logits`` now holds the log-softmax, in place
        total -= torch.where(v, logp, 0.0).sum()
        if not (need_h or need_w or need_b):
            continue
        d = logits.exp_()  # softmax, in place: (n, V)
        d.scatter_add_(1, t[:, None], torch.full_like(logp[:, None], -1.0))  # minus the one-hot target
        d.mul_(v[:, None])  # ignored rows contribute nothing
        if need_b:
            grad_b += d.sum(0)
        if direct:
            if need_h:
                torch.mm(d, weight, out=grad_h[sl])  # (n, C)
            if need_w:
                grad_w.addmm_(d.t(), h)  # (V, C)
            continue
        d = d.to(weight.dtype)
        if need_h:
            grad_h[sl] = d @ weight  # (n, C)
        if need_w:
            grad_w += d.t() @ h.to(d.dtype)  # (V, C)
    return total, grad_h, grad_w, grad_b


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` whose gradients are computed in the forward, chunk by chunk.

    For each chunk of rows: ``logits`` (n, V) in float32, turned in place into the log-softmax by
    :func:`lightning_llm.ops.log_softmax_gather` (which also gives the target's log-probability), then in place
    ``d_logits = softmax(logits) - onehot(target)`` (zero on ignored rows), ``grad_hidden = d_logits @ W``,
    ``grad_W += d_logits.T @ hidden``, ``grad_b += d_logits.sum(0)``. The backward only multiplies the stored gradients
    by the incoming scalar. Compared with autograd over ``F.cross_entropy`` this needs no second logits matmul (no
    recomputation) and no (N, V) log-softmax, zero-fill and scatter passes; peak extra memory is one (n, V) float32
    buffer, reused by every chunk, plus the gradients of ``hidden`` and (float32) ``weight``; nothing when neither
    needs a gradient (a frozen output layer keeps no ``(V, C)`` gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, chunk_size: int):  # noqa: D102
        need = tuple(ctx.needs_input_grad[:3])
        total, grad_h, grad_w, grad_b = _fused_ce(hidden, weight, bias, targets, ignore_index, chunk_size, need)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 4096,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` without holding all ``(N, V)`` logits at once.

    Design choice: rows are processed in chunks of ``chunk_size``. For dense tensors a fused
    linear + cross-entropy function computes each chunk's gradients right after its loss (Liger-Kernel style),
    so nothing is recomputed in the backward and only one ``(chunk_size, V)`` float32 block of logits exists at a time
    (without gradients the same loop only sums the losses).
    Subclassed tensors (DTensor under tensor parallelism) take a generic path instead: each chunk under activation
    checkpointing (backward recomputes the chunk's logits), or plain ``F.cross_entropy`` when there is one chunk.
    The mean is over rows whose target is not ``ignore_index``; if every row is ignored the loss is 0 (not nan).

    Args:
        hidden: ``(N, C)`` final hidden states.
        weight: ``(V_padded, C)`` output projection.
        targets: ``(N,)`` next-token ids, ``ignore_index`` where not scored.
        bias: ``(V_padded,)`` optional output bias.
        ignore_index: target value of rows that are not scored.
        chunk_size: rows per chunk.
        vocab_size: the real vocabulary when ``weight`` is padded; padded logits are excluded from the softmax.
    """
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
    n = hidden.shape[0]
    count = (targets != ignore_index).sum()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if is_plain(hidden) and is_plain(weight) and is_plain(bias):
        if needs_grad:
            total = _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk_size)
        else:
            total = _fused_ce(hidden, weight, bias, targets, ignore_index, chunk_size, (False, False, False))[0]
    elif n <= chunk_size:
        total = _chunk_ce(hidden, weight, bias, targets, ignore_index)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            if needs_grad:
                total = total + checkpoint(
                    _chunk_ce, hidden[sl], weight, bias, targets[sl], ignore_index, use_reentrant=False
                )
            else:
                total = total + _chunk_ce(hidden[sl], weight, bias, targets[sl], ignore_index)
    return total / count.clamp(min=1)


class ScalarHead(nn.Module):
    """A linear map from the width to one number per position (reward model and value head)."""

    def __init__(self, n_embd: int, bias: bool = True, init_std: float | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(n_embd, 1, bias=bias)
        nn.init.normal_(self.proj.weight, std=init_std if init_std is not None else 1.0 / (n_embd + 1) ** 0.5)
        if bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T)``."""
        return self.proj(hidden).squeeze(-1)
