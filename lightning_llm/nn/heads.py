"""Output heads: the next-token loss computed in chunks, and a scalar head for reward and value models.

Notation: N rows (B*T flattened), C width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              ignore_index: int) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (n, V) float32 for this chunk only
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` without holding all ``(N, V)`` logits at once.

    Design choice: rows are processed in chunks of ``chunk_size`` and each chunk is wrapped in activation
    checkpointing, so the forward keeps only the hidden chunk and backward recomputes the chunk's logits. Peak extra
    memory is one ``(chunk_size, V)`` float32 block instead of ``(N, V)`` in the compute dtype plus its float32 copy.
    When ``N * V`` is small (a single chunk) the plain path is taken: there is nothing to save.

    Args:
        hidden: ``(N, C)`` final hidden states.
        weight: ``(V_padded, C)`` output projection.
        targets: ``(N,)`` next-token ids, ``ignore_index`` where not scored.
        vocab_size: the real vocabulary when ``weight`` is padded; padded logits are excluded from the softmax.
    """
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
    n = hidden.shape[0]
    count = (targets != ignore_index).sum()
    if n <= chunk_size:
        total = _chunk_ce(hidden, weight, bias, targets, ignore_index)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            if torch.is_grad_enabled() and hidden.requires_grad:
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
