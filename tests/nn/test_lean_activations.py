"""What a block keeps for its backward: the SwiGLU function (two saved inputs, not three) and the recomputed norm
outputs / MLP activation (:func:`lightning_llm.nn.transformer.recompute_saved`), against plain autograd.

Every comparison is against the same model run with the plain expressions (``F.silu(gate) * up``, nothing
recomputed), i.e. against autograd's own derivatives, in float64.

Notation: B batch, T tokens, C width, I MLP width, L layers.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_llm.nn.transformer as T
from lightning_llm.config import TransformerConfig

LLAMA = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
NEOX = dict(LLAMA, norm="layernorm", mlp="gelu", parallel_residual=True)
GPTJ = dict(NEOX, shared_attention_norm=True, gelu_approximate="tanh")


@contextlib.contextmanager
def plain_autograd(monkeypatch: pytest.MonkeyPatch):
    """The model as autograd alone runs it: no recomputation, SwiGLU as ``F.silu(gate) * up``."""
    with monkeypatch.context() as m:
        m.setattr(T, "recompute_saved", lambda value, fn: contextlib.nullcontext())
        m.setattr(T, "swiglu", lambda gate, up: F.silu(gate) * up)
        yield


def _model(fields: dict, seed: int = 0, **extra) -> T.Transformer:
    torch.manual_seed(seed)
    model = T.Transformer(TransformerConfig(**fields, **extra)).double()
    with torch.no_grad():  # norm weights / biases away from their 1 / 0 init, so their gradients are not trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _loss_and_grads(model: T.Transformer, ids: torch.Tensor, retain: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(ids, targets=ids.roll(-1, 1))
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("need", ["both", "gate", "up"])
def test_swiglu_function_matches_autograd_float64(need: str) -> None:
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(3, 5, 7, generator=g, dtype=torch.float64)).requires_grad_(need in ("both", "gate"))
    up = torch.randn(3, 5, 7, generator=g, dtype=torch.float64).requires_grad_(need in ("both", "up"))
    grad_out = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    inputs = [t for t in (gate, up) if t.requires_grad]
    out = T._SwiGLU.apply(gate, up)
    ref = F.silu(gate) * up  # autograd's own derivative of the plain expression
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)
    got = torch.autograd.grad(out, inputs, grad_out)
    exp = torch.autograd.grad(ref, inputs, grad_out)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(T._SwiGLU.apply, (gate, up))
    assert torch.autograd.gradgradcheck(T._SwiGLU.apply, (gate, up))  # double backward: the out-of-place branch


def test_swiglu_half_precision_backward_in_float32() -> None:
    """bf16 inputs: the gradient is the float32 formula rounded once, as autograd's ``silu_backward`` computes it."""
    g = torch.Generator().manual_seed(1)
    gate, up, d = (torch.randn(4, 9, generator=g).bfloat16() for _ in range(3))
    gate.requires_grad_(), up.requires_grad_()
    got = torch.autograd.grad(T._SwiGLU.apply(gate, up), (gate, up), d)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    exp = torch.autograd.grad(F.silu(g32) * u32, (g32, u32), d.float())
    for a, b in zip(got, exp, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=8e-3, atol=1e-3)  # one bf16 rounding (2^-8 relative)


def test_swiglu_saves_two_tensors_not_three() -> None:
    gate = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        T._SwiGLU.apply(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.silu(gate) * up
    assert len(saved) == 3  # autograd: gate (silu), silu(gate) and up (mul)


# ---------------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("fields", [LLAMA, NEOX, GPTJ], ids=["llama", "neox", "gptj"])
def test_lean_block_same_loss_and_gradients(monkeypatch, fields: dict) -> None:
    model = _model(fields)
    ids = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(2))
    loss, grads = _loss_and_grads(model, ids)
    with plain_autograd(monkeypatch):
        ref_loss, ref_grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_retained_graph_and_double_backward(monkeypatch) -> None:
    """A retained graph rebuilds the activations again on its second backward; ``create_graph=True`` differentiates
    through the rebuilt tensors (eager attention: SDPA on CPU has no double backward)."""
    model = _model(LLAMA, attention_backend="eager")
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())

    def run():
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        first = torch.autograd.grad(loss, params, retain_graph=True)
        second = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g**2).sum() for g in second)
        return first, second, torch.autograd.grad(penalty, params)

    lean = run()
    with plain_autograd(monkeypatch):
        plain = run()
    for got, exp in zip(lean, plain, strict=True):
        for a, b in zip(got, exp, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(lean[0], lean[1], strict=True):  # the retained graph's second backward: the same gradients
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)  # (its SwiGLU formula out of place: rounding)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive (a storage dies with its last tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
        return out


def test_saved_activations_are_two_norm_outputs_and_two_mlp_tensors_a_layer_smaller(monkeypatch) -> None:
    """After the forward, the lean model holds exactly L * (2 B T C + 2 B T I) fewer bytes: per layer the two norm
    outputs (attention's and the MLP's input) and the SwiGLU's ``silu(gate)`` and product, all rebuilt in the
    backward from tensors autograd keeps anyway."""
    model = _model(LLAMA).float()  # float32: RMSNorm's fused kernel, which keeps its input x for the backward
    cfg = model.config
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(4))

    def held_after_forward() -> tuple[int, torch.Tensor]:
        with _LiveBytes() as mode:
            hidden = model(ids, return_hidden=True)
        return sum(mode.live.values()) - hidden.untyped_storage().nbytes(), hidden

    lean, h1 = held_after_forward()
    with plain_autograd(monkeypatch):
        plain, h2 = held_after_forward()
    n, item = ids.numel(), 4  # float32
    assert plain - lean == cfg.n_layer * (2 * n * cfg.n_embd + 2 * n * cfg.intermediate_size) * item
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)


def _graph_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


@pytest.mark.parametrize("fields", [LLAMA, NEOX], ids=["llama", "neox"])
def test_a_forward_without_backward_frees_its_graph(fields: dict) -> None:
    """A forward whose output is dropped without a backward (an evaluation with gradients enabled, a skipped step)
    frees its graph. A saved value the hooks pass through must not be the saved tensor itself: SDPA's output saved
    for its own backward would then hold its ``grad_fn``, the node holding it, a cycle through C++ that Python's
    garbage collector never breaks (every such forward leaked its graph and activations; a Lightning
    ``validate`` after ``fit`` under pipeline + tensor parallelism then failed to move the parameters)."""
    model = _model(fields).float()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(6))
    before = _graph_tensors()
    for _ in range(3):
        out = model(ids)
        assert out.grad_fn is not None
        del out
    assert _graph_tensors() == before
    loss = model(ids).logsumexp(-1).mean()  # and after a backward, nothing is kept either
    loss.backward()
    del loss
    assert _graph_tensors() == before


def test_off_inside_foreign_saved_tensor_hooks_and_without_grad() -> None:
    """Activation checkpointing (or any other saved-tensor hooks) must see every saved tensor: recompute_saved then
    changes nothing; neither does it without gradients. Nested inside itself it delegates outwards."""
    x = torch.randn(2, 3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert isinstance(T.recompute_saved(x * 2, lambda: x * 2), contextlib.nullcontext)
    with torch.no_grad():
        assert isinstance(T.recompute_saved(x * 2, lambda: x * 2), contextlib.nullcontext)
    y = x * 2
    with T.recompute_saved(y, lambda: x * 2):
        z = y.exp()  # ``exp`` saves its output, not ``y``: passed through
        usable, outer = T._outer_hooks()
        assert usable and isinstance(outer, T._RecomputeState)
        w = y.sin()  # saves y: a marker, rebuilt in the backward
    (z.sum() + w.sum()).backward()
    torch.testing.assert_close(x.grad, 2 * (2 * x).exp().detach() + 2 * (2 * x).cos().detach())


def test_gradient_checkpointing_keeps_its_own_hooks() -> None:
    """Blocks under non-reentrant activation checkpointing: the same gradients (the lean hooks stand aside)."""
    from lightning_llm.parallel import apply_activation_checkpointing

    model = _model(LLAMA)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(5))
    loss, grads = _loss_and_grads(model, ids)
    apply_activation_checkpointing(model)
    ck_loss, ck_grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ck_loss, rtol=0, atol=1e-12)
    for a, b in zip(grads, ck_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
