"""``lightning_llm.ops.token_logprobs`` against independent references.

References: ``-F.cross_entropy(reduction="none")`` (PyTorch's own kernel) and a naive float64 loop written here,
one row at a time, ``z_t - log(sum_v exp(z_v))`` with the max subtracted by hand.

Notation: B batch, T positions, V vocabulary, N = B*T rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_llm.ops import IGNORE_INDEX, chunk_rows, is_plain, log_softmax_gather, row_chunks, token_logprobs


def _naive(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0):
    """float64, row by row: ``z[t] - (m + log(sum exp(z - m)))``, 0 where ignored (differentiable)."""
    z = logits.double() / temperature
    flat, tgt = z.reshape(-1, z.shape[-1]), targets.reshape(-1)
    out = []
    for i in range(flat.shape[0]):
        if int(tgt[i]) == ignore_index:
            out.append(flat[i].sum() * 0.0)
            continue
        m = flat[i].max().detach()
        out.append(flat[i, int(tgt[i])] - (m + torch.log(torch.exp(flat[i] - m).sum())))
    return torch.stack(out).reshape(targets.shape)


def _data(b: int = 3, t: int = 7, v: int = 11, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * scale
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[0, :2] = IGNORE_INDEX
    targets[-1, -1] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5, 21, 22, 1000])  # N = 21: 1 row, not dividing, exact, larger
def test_matches_cross_entropy_and_naive_loop(chunk_size) -> None:
    logits, targets = _data()
    got = token_logprobs(logits, targets, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    ce = -F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none").reshape(targets.shape)
    torch.testing.assert_close(got, ce, atol=1e-6, rtol=1e-6)  # cross_entropy gives 0 at ignore_index too
    torch.testing.assert_close(got.double(), _naive(logits, targets), atol=1e-5, rtol=1e-6)
    assert (got[targets == IGNORE_INDEX] == 0).all()


def test_ignore_index_temperature_and_leading_dims() -> None:
    logits, targets = _data(b=4, t=5, v=9, seed=1)
    targets = torch.where(targets == IGNORE_INDEX, 3, targets)
    targets[1, 1] = targets[3, 0] = 7  # a custom ignore value inside the vocabulary
    got = token_logprobs(logits.view(2, 2, 5, 9), targets.view(2, 2, 5), ignore_index=7, temperature=0.6, chunk_size=3)
    ref = _naive(logits, targets, ignore_index=7, temperature=0.6).view(2, 2, 5)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-6)
    assert got[0, 1, 1] == 0 and got[1, 1, 0] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_computed_in_float32(dtype) -> None:
    logits, targets = _data(seed=2, scale=8.0)
    low = logits.to(dtype)
    got = token_logprobs(low, targets, chunk_size=4)
    assert got.dtype == torch.float32
    # reference: the same rounded inputs, in float64 (not the float32 originals, which differ by rounding)
    torch.testing.assert_close(got.double(), _naive(low.double(), targets), atol=1e-5, rtol=1e-6)


def test_float64_stays_float64_and_extreme_gaps_are_finite() -> None:
    logits = torch.zeros(1, 2, 5, dtype=torch.float64)
    logits[0, 0, 1] = 1000.0  # softmax-then-log would give log(0) = -inf for every other token
    got = token_logprobs(logits, torch.tensor([[0, 1]]))
    assert got.dtype == torch.float64
    assert got[0, 0].item() == pytest.approx(-1000.0) and got[0, 1].item() == pytest.approx(-math.log(5))


def test_non_viewable_logits_are_chunked_along_t_without_error() -> None:
    """``logits[:, :-1]`` cannot be viewed as (N, V): chunks run inside each sequence."""
    logits, targets = _data(b=3, t=8, v=6, seed=3)
    sliced = logits[:, :-1]
    with pytest.raises(RuntimeError):
        sliced.view(-1, 6)
    got = token_logprobs(sliced, targets[:, 1:], chunk_size=3)
    torch.testing.assert_close(got.double(), _naive(sliced, targets[:, 1:]), atol=1e-5, rtol=1e-6)
    starts = [s for s, c in row_chunks(sliced, 3)]
    assert starts == [0, 3, 6, 7, 10, 13, 14, 17, 20]  # T = 7 per sequence: 3 + 3 + 1


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradient_matches_autograd_of_naive(chunk_size: int, temperature: float) -> None:
    logits, targets = _data(seed=4)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(5))  # a non-uniform upstream grad
    x = logits.clone().requires_grad_()
    (token_logprobs(x, targets, temperature=temperature, chunk_size=chunk_size) * weights).sum().backward()
    ref_x = logits.double().requires_grad_()
    (_naive(ref_x, targets, temperature=temperature) * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)
    assert (x.grad[targets == IGNORE_INDEX] == 0).all()


def test_gradient_of_sliced_and_bf16_logits() -> None:
    logits, targets = _data(b=2, t=6, v=7, seed=6)
    x = logits.bfloat16().requires_grad_()
    token_logprobs(x[:, :-1], targets[:, 1:], chunk_size=2).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and (x.grad[:, -1] == 0).all()
    ref_x = logits.bfloat16().double().requires_grad_()
    _naive(ref_x[:, :-1], targets[:, 1:]).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-2, rtol=1e-2)  # bf16 gradient rounding


def test_nan_at_ignored_positions_changes_nothing() -> None:
    logits, targets = _data(seed=7)
    dirty = logits.clone()
    dirty[targets == IGNORE_INDEX] = float("nan")
    x = dirty.requires_grad_()
    out = token_logprobs(x, targets, chunk_size=4)
    out.sum().backward()
    torch.testing.assert_close(out, token_logprobs(logits, targets))
    assert torch.isfinite(x.grad).all()


def test_no_grad_path_keeps_no_graph_and_grad_path_saves_no_float32_copy() -> None:
    logits, targets = _data(seed=8)
    assert not token_logprobs(logits, targets).requires_grad
    x = logits.bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(x, targets, chunk_size=2)
    # autograd keeps the bf16 input itself and (N,) index tensors, never a (N, V) float32 activation
    assert not any(t.dtype == torch.float32 and t.dim() >= 2 for t in saved)


def test_subclass_takes_plain_autograd(monkeypatch) -> None:
    import lightning_llm.ops as ops

    monkeypatch.setattr(ops, "is_plain", lambda t: False)
    logits, targets = _data(seed=9)
    x = logits.clone().requires_grad_()
    token_logprobs(x, targets, temperature=0.5, chunk_size=4).sum().backward()
    ref_x = logits.double().requires_grad_()
    _naive(ref_x, targets, temperature=0.5).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)


def test_empty_and_bad_inputs() -> None:
    assert token_logprobs(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    logits, targets = _data()
    with pytest.raises(TypeError, match="`logits` must be a floating-point"):
        token_logprobs(targets, targets)
    with pytest.raises(TypeError, match="`targets` must be an integer"):
        token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match=r"`targets` must have shape .*Fix"):
        token_logprobs(logits, targets[:, 1:])
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
            token_logprobs(logits, targets, temperature=bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="`chunk_size` must be None or an int >= 1"):
            token_logprobs(logits, targets, chunk_size=bad)


def test_helpers() -> None:
    assert chunk_rows(1000, torch.device("cpu"), 8000) == 2 and chunk_rows(10**9, torch.device("cpu")) == 1
    assert chunk_rows(1000, torch.device("meta"), None) == 256 * 1024**2 // 4000
    with pytest.raises(ValueError, match="chunk_bytes"):
        chunk_rows(10, torch.device("cpu"), 0)
    assert is_plain(None) and is_plain(torch.zeros(1)) and is_plain(torch.nn.Parameter(torch.zeros(1)))

    class Sub(torch.Tensor):
        pass

    assert not is_plain(torch.zeros(1).as_subclass(Sub))
    z = torch.randn(4, 6)
    buf = torch.empty(4, 6)
    t = torch.tensor([0, 5, 2, 2])
    expected = -F.cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(log_softmax_gather(z, t, out=buf), expected)
    torch.testing.assert_close(buf, torch.log_softmax(z, -1))
    torch.testing.assert_close(log_softmax_gather(z.clone(), t), expected)
    in_place = z.clone()
    torch.testing.assert_close(log_softmax_gather(in_place, t, out=in_place), expected)  # as nn/heads.py uses it
    torch.testing.assert_close(in_place, torch.log_softmax(z, -1))


def test_doctest() -> None:
    import doctest

    import lightning_llm.ops as ops

    assert doctest.testmod(ops, raise_on_error=True).attempted >= 1
