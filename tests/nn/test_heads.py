"""``chunked_cross_entropy`` against ``torch.nn.functional.cross_entropy`` on materialised logits; ``ScalarHead``.

Notation: N rows, C width, V vocabulary (V_pad rows in a padded output table).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_llm.nn import ScalarHead, chunked_cross_entropy


def _leaves(n: int, c: int, v_pad: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g).requires_grad_()
    weight = (torch.randn(v_pad, c, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(v_pad, generator=g) * 0.1).requires_grad_() if bias else None
    return hidden, weight, b


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 4096])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("v,v_pad", [(37, 37), (37, 48)])
def test_matches_cross_entropy_value_and_gradients(chunk_size: int, bias: bool, v: int, v_pad: int) -> None:
    n, c = 50, 12
    hidden, weight, b = _leaves(n, c, v_pad, bias)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    targets[::5] = -100  # ignored rows
    loss = chunked_cross_entropy(hidden, weight, targets, bias=b, chunk_size=chunk_size, vocab_size=v)
    grads = torch.autograd.grad(loss, [t for t in (hidden, weight, b) if t is not None])

    ref_h, ref_w, ref_b = _leaves(n, c, v_pad, bias)
    # the reference: full logits over the real vocabulary only (padded rows are not part of the softmax)
    logits = F.linear(ref_h, ref_w[:v], ref_b[:v] if ref_b is not None else None)  # (N, V)
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [t for t in (ref_h, ref_w, ref_b) if t is not None])
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)
    # padded rows of the output table get exactly zero gradient
    if v_pad > v:
        assert torch.count_nonzero(grads[1][v:]) == 0


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("frozen", [None, "hidden", "weight"])
def test_gradient_paths(monkeypatch, path: str, frozen: str | None) -> None:
    """The fused autograd function and the generic path (DTensor inputs: checkpointed F.cross_entropy) agree with the
    reference whichever inputs need gradients; without gradients the loss is the same number."""
    import lightning_llm.nn.heads as heads

    if path == "generic":
        monkeypatch.setattr(heads, "is_plain", lambda t: False)
    hidden, weight, b = _leaves(30, 8, 21, True, seed=3)
    if frozen == "hidden":
        hidden.requires_grad_(False)
    if frozen == "weight":
        weight.requires_grad_(False)
    targets = torch.randint(0, 21, (30,), generator=torch.Generator().manual_seed(4))
    targets[3] = -100
    leaves = [t for t in (hidden, weight, b) if t.requires_grad]
    loss = chunked_cross_entropy(hidden, weight, targets, bias=b, chunk_size=8)
    grads = torch.autograd.grad(loss * 3.0, leaves)  # a non-unit upstream gradient
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets)
    ref_grads = torch.autograd.grad(ref * 3.0, leaves)
    torch.testing.assert_close(loss, ref)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, bias=b, chunk_size=8), ref)


def test_bf16_weights_without_autocast() -> None:
    """A model cast to bf16 (no autocast): gradients come back in bf16, the loss in float32."""
    hidden, weight, _ = _leaves(24, 16, 19, False, seed=5)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    targets = torch.randint(0, 19, (24,), generator=torch.Generator().manual_seed(6))
    loss = chunked_cross_entropy(h16, w16, targets, chunk_size=10)
    loss.backward()
    assert loss.dtype == torch.float32 and h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    ref_h, ref_w = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.T, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(h16.grad.float(), ref_h.grad, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(w16.grad.float(), ref_w.grad, atol=2e-3, rtol=2e-2)


def test_custom_ignore_index_and_all_ignored() -> None:
    hidden, weight, _ = _leaves(10, 4, 9, False)
    targets = torch.tensor([1, 2, 7, 7, 0, 3, 7, 8, 5, 7])
    got = chunked_cross_entropy(hidden, weight, targets, ignore_index=7, chunk_size=3)
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=7)
    torch.testing.assert_close(got, ref)
    # every row ignored: a zero loss (F.cross_entropy's mean would be 0/0 = nan) with zero gradients
    none = chunked_cross_entropy(hidden, weight, torch.full((10,), -100), chunk_size=3)
    assert none.item() == 0.0
    (g,) = torch.autograd.grad(none, hidden)
    assert torch.count_nonzero(g) == 0


def test_bf16_autocast_is_float32_loss() -> None:
    hidden, weight, _ = _leaves(40, 16, 33, False)
    targets = torch.randint(0, 33, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(hidden.bfloat16().float() @ weight.bfloat16().float().T, targets)
    torch.testing.assert_close(loss, ref, atol=0.02, rtol=0.01)


def test_model_loss_equals_cross_entropy_on_logits() -> None:
    from lightning_llm.config import TransformerConfig
    from lightning_llm.nn import Transformer

    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(
            vocab_size=30, padded_vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, lm_head_bias=True
        )
    )
    ids = torch.randint(0, 30, (3, 10))
    targets = torch.randint(0, 30, (3, 10))
    targets[0, :4] = -100
    logits = model(ids)
    assert logits.shape == (3, 10, 30)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(ids, targets=targets), ref, atol=1e-6, rtol=1e-5)


def test_scalar_head() -> None:
    torch.manual_seed(0)
    head = ScalarHead(8)
    h = torch.randn(2, 5, 8)
    out = head(h)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, h @ head.proj.weight[0] + head.proj.bias[0])
    assert head.proj.bias.item() == 0.0


def test_fused_loss_reuses_one_logits_buffer_and_accumulates_in_place() -> None:
    """Many chunks, trainable output layer: one ``(chunk, V)`` float32 block for every chunk's logits and one
    ``(V, C)`` gradient, never a ``(V, C)`` product per chunk; the gradients still match autograd's."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class NewStorages(TorchDispatchMode):
        """The byte sizes of the storages the ops under it allocate (in-place ops and views allocate none)."""

        def __init__(self) -> None:
            super().__init__()
            self.live: set[int] = set()  # storages alive now (a dead one's address may be reused)
            self.created: list[int] = []

        def _new(self, t: torch.Tensor) -> bool:
            storage = t.untyped_storage()
            if storage._cdata in self.live:
                return False
            self.live.add(storage._cdata)
            weakref.finalize(storage, self.live.discard, storage._cdata)
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in (*args, *(kwargs or {}).values()):
                if isinstance(t, torch.Tensor):
                    self._new(t)
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and self._new(t):
                    self.created.append(t.untyped_storage().nbytes())
            return out

    n, c, v, chunk = 40, 6, 29, 8
    hidden, weight, _ = _leaves(n, c, v, False, seed=7)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(8))
    with NewStorages() as mode:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    assert mode.created.count(chunk * v * 4) == 1  # 5 chunks, one float32 buffer
    assert mode.created.count(v * c * 4) == 1  # the zero-initialised gradient only
    got = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy(F.linear(hidden, weight), targets)
    for a, b in zip(got, torch.autograd.grad(ref, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
