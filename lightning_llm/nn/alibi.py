"""ALiBi: attention with linear biases (Press et al., ICLR 2022).

Notation: B batch, H heads, Tq queries, Tk keys.

Head h adds ``m_h * (j - i)`` to the logit of query i and key j (after the ``1/sqrt(D)`` scaling). Because softmax is
invariant to a constant per query row, ``m_h * j`` gives the same probabilities; positions j come from the
attention mask's cumulative sum (as BLOOM does), so left padding changes nothing.

Slopes for n heads: for n a power of two, the geometric sequence starting at ``2^(-8/n)`` with that ratio. Otherwise
take the slopes of the closest smaller power of two c, then every other slope (indices 0, 2, 4, ...) of the 2c-head
sequence until n are reached -- deliberately unsorted, identical to the paper's code, BLOOM and MPT.
"""

from __future__ import annotations

import math

import torch


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi slopes ``(n_head,)`` in float32 for any positive head count."""
    if not isinstance(n_head, int) or n_head <= 0:
        raise ValueError(f"alibi_slopes: n_head must be a positive integer, got {n_head!r}.")
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = _power_of_two_slopes(closest)
    if closest < n_head:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive bias ``m_h * (k_pos - q_pos)`` in float32.

    Args:
        slopes: ``(H,)``.
        q_pos: query positions ``(B, Tq)``.
        k_pos: key positions ``(B, Tk)``.

    Returns:
        ``(B, H, Tq, Tk)``.
    """
    rel = (k_pos[:, None, :] - q_pos[:, :, None]).to(torch.float32)  # (B, Tq, Tk)
    return slopes.to(rel.device)[None, :, None, None] * rel[:, None]  # (B, H, Tq, Tk)
