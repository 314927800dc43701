"""A preallocated key/value cache for incremental decoding.

Notation: B batch, G key/value heads, S_max cache capacity, T new tokens, D head dim.

Each layer owns ``k`` and ``v`` tensors ``(B, G, S_max, D)``, allocated once. Two ways to fill them:

* **growing** (:meth:`update`, any forward with ``kv_cache=``): a forward pass with ``T`` new tokens writes slots
  ``[length, length + T)`` in every layer and gets back the filled slots ``(B, G, length + T, D)``; the Transformer
  then advances ``length`` once (:meth:`advance`). Shapes change at every step: simple, and what the prefill uses.
* **static** (:meth:`write`, the decode step of :func:`~lightning_llm.nn.generation.generate`): one token per row
  is written at ``slot``, a ``(1,)`` long *tensor*, and attention reads the slots written so far (a view of the
  buffers, as wide as the step's key mask). No Python integer enters the step's arithmetic, so ``torch.compile``
  builds one graph for all steps (its only dynamic sizes: the slots read and the capacity); ``length`` is not
  advanced (the caller owns the slot counter).

:class:`SharedPrefixCache` is a read-only variant for scoring: one row's cached prefix seen by every row of a batch,
without copying it per row.

Keys are stored after RoPE, so cached keys are never rotated again. ``pos`` ``(B, S_max)`` holds each slot's position
(ALiBi reads it as the key positions).
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

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Static decoding: write ``k, v`` ``(B, G, 1, D)`` at ``slot`` (a ``(1,)`` long tensor in
        ``[0, max_length)``) and return the whole buffers ``(B, G, S_max, D)``; the caller masks unwritten slots.

        No bounds check here (it would read the tensor back to the host at every layer of every step, and break a
        compiled graph): :func:`~lightning_llm.nn.generation.generate` sizes the cache before decoding.
        """
        buf_k, buf_v = self.k[layer], self.v[layer]
        buf_k.index_copy_(2, slot, k.to(buf_k.dtype))  # a float32 cache under autocast: store in its dtype
        buf_v.index_copy_(2, slot, v.to(buf_v.dtype))
        return buf_k, buf_v

    def copy_rows(self, source: KVCache, rows: torch.Tensor) -> None:
        """Fill this cache's first ``source.length`` slots of every row ``i`` with row ``rows[i]`` of ``source``
        (keys, values and positions; ``rows`` a ``(B,)`` long tensor of source rows, repeats allowed), and set
        ``length`` to ``source.length``: one cached prefix shared by several rows (repeated prompts, the answers of
        one multiple-choice context)."""
        n = source.length
        for dst, src in zip((*self.k, *self.v), (*source.k, *source.v)):
            dst[:, :, :n] = src[:, :, :n].index_select(0, rows)
        self.pos[:, :n] = source.pos[:, :n].index_select(0, rows)
        self.length = n

    def copy_slots(self, source: KVCache, slots: torch.Tensor) -> None:
        """Fill this cache's first ``C`` slots of every row ``i`` with slot ``slots[i, j]`` of ``source``'s row 0
        (keys, values and positions; ``slots`` a ``(B, C)`` long tensor, repeats allowed), and set ``length`` to
        ``C``: one cached prefix placed at a different offset in each row (left-padded prompts that start alike)."""
        c = slots.shape[1]
        for dst, src in zip((*self.k, *self.v), (*source.k, *source.v)):
            dst[:, :, :c] = src[0][:, slots].transpose(0, 1)  # (G, B, C, D) -> (B, G, C, D)
        self.pos[:, :c] = source.pos[0][slots]
        self.length = c

    def put_rows(self, source: KVCache, rows: torch.Tensor) -> None:
        """Write ``source``'s rows (its first ``source.length`` slots) into this cache's rows ``rows`` (a long tensor
        of ``source``'s batch size) and set ``length`` to ``source.length``: caches filled apart, then joined."""
        n = source.length
        for dst, src in zip((*self.k, *self.v), (*source.k, *source.v)):
            dst[rows, :, :n] = src[:, :, :n]
        self.pos[rows, :n] = source.pos[:, :n]
        self.length = n

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class SharedPrefixCache:
    """One cached prefix read by every row of a batch: the first ``prefix.length`` slots of row 0 of ``prefix`` (a
    :class:`KVCache`), for a forward pass of ``batch_size`` rows that all begin with those tokens.

    It takes a :class:`KVCache`'s place in the growing-cache forward (``model(ids, kv_cache=...)``): :meth:`update`
    returns the prefix's keys and values, broadcast to the batch, followed by the new ones, and stores nothing, so a
    batch of B rows that share L leading tokens costs one row's L positions plus B rows of the rest, and the memory
    of one row's prefix (the concatenation lives for one layer's attention at a time). Used to score requests that
    share few-shot examples (:class:`~lightning_llm.evaluation.HarnessLM`).
    """

    def __init__(self, prefix: KVCache, batch_size: int, new_tokens: int) -> None:
        self.prefix = prefix
        self.length = prefix.length
        self.max_length = prefix.length + new_tokens
        self.pos = torch.empty(batch_size, self.max_length, dtype=torch.long, device=prefix.pos.device)
        self.pos[:, : self.length] = prefix.pos[0, : self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, G, L + T, D)`` keys and values: the prefix's L (broadcast), then ``k, v`` ``(B, G, T, D)``."""
        n = self.prefix.length
        pk = self.prefix.k[layer][:1, :, :n].expand(k.shape[0], -1, -1, -1)
        pv = self.prefix.v[layer][:1, :, :n].expand(v.shape[0], -1, -1, -1)
        return torch.cat((pk, k.to(pk.dtype)), dim=2), torch.cat((pv, v.to(pv.dtype)), dim=2)

    def advance(self, n: int) -> None:
        self.length += n
