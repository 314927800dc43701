"""A preallocated key/value cache for incremental decoding.

Notation: B batch, G key/value heads, S_max cache capacity, T new tokens, D head dim.

Each layer owns ``k`` and ``v`` tensors ``(B, G, S_max, D)``. A forward pass with ``T`` new tokens writes slots
``[length, length + T)`` in every layer and then advances ``length`` once (:meth:`advance`, called by the Transformer).
Keys are stored after RoPE, so cached keys are never rotated again.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_head, max_length, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = torch.zeros(batch_size, max_length, device=device, dtype=torch.long)  # positions of the slots
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``(B, G, T, D)`` at the current end; return all filled slots ``(B, G, length + T, D)``."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"KVCache overflow: {end} slots needed but max_length is {self.max_length}; "
                "allocate the cache with max_length >= prompt length + max_new_tokens."
            )
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
