"""Masked statistics against numpy / scikit-learn on the selected entries, and a hypothesis property for whitening."""

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from sklearn.metrics import explained_variance_score

from lightning_llm.rlhf import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten


def _batch(seed: int = 0, b: int = 4, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g, dtype=torch.float64) * 3 + 1
    lengths = torch.tensor([7, 3, 1, 5])[:b]
    starts = torch.tensor([0, 2, 4, 1])[:b]
    pos = torch.arange(t)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths).clamp(max=t)[:, None])  # leading and trailing pads
    return x, mask


def test_masked_sum_mean_var_match_numpy_on_selected_entries():
    x, mask = _batch()
    sel = x[mask].numpy()  # boolean indexing: an independent path to the valid entries
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(sel.sum(), dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(sel.mean(), dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(np.var(sel, ddof=1), dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(np.var(sel), dtype=torch.float64))


def test_masked_stats_per_row_match_loop():
    x, mask = _batch()
    rows_mean = [x[i][mask[i]].mean().item() for i in range(x.shape[0])]
    rows_sum = [x[i][mask[i]].sum().item() for i in range(x.shape[0])]
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor(rows_mean, dtype=torch.float64))
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor(rows_sum, dtype=torch.float64))
    assert masked_mean(x, mask, dim=1, keepdim=True).shape == (4, 1)
    var_rows = masked_var(x, mask, dim=1)
    for i in range(x.shape[0]):
        sel = x[i][mask[i]].numpy()
        if sel.size >= 2:
            assert var_rows[i].item() == pytest.approx(np.var(sel, ddof=1))
        else:  # one valid entry: the unbiased variance is undefined -> NaN, never a silent 0
            assert torch.isnan(var_rows[i])


def test_hand_values_and_empty_selection():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])  # an integer 0/1 mask is accepted
    # valid entries 1, 2, 3: mean 2, unbiased var ((1)+(0)+(1))/2 = 1, biased 2/3
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(1.0)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    assert torch.isnan(masked_mean(x, torch.zeros_like(m)))
    assert masked_sum(x, torch.zeros_like(m)).item() == 0.0


def test_masked_whiten_matches_numpy_and_zeroes_padding():
    x, mask = _batch(seed=3)
    sel = x[mask].numpy()
    expected = (sel - sel.mean()) / np.sqrt(np.var(sel, ddof=1) + 1e-8)
    out = masked_whiten(x, mask)
    np.testing.assert_allclose(out[mask].numpy(), expected, rtol=1e-10)
    assert torch.all(out[~mask] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(kept[mask].numpy(), expected + sel.mean(), rtol=1e-10)


def test_masked_whiten_needs_two_valid_entries():
    with pytest.raises(ValueError, match="at least 2 valid"):
        masked_whiten(torch.randn(2, 3), torch.tensor([[False, True, False], [False, False, False]]))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=6, max_size=40),
    mask_bits=st.lists(st.booleans(), min_size=40, max_size=40),
    pad_value=st.floats(allow_nan=True, allow_infinity=True),
)
@example(data=[0.0, 0.125, 0.0, 0.0, 0.0, 0.0], mask_bits=[False] * 40, pad_value=0.0)  # CI's failure, var 0.0078
def test_whitening_gives_mean_zero_var_one_on_valid_tokens(data, mask_bits, pad_value):
    x = torch.tensor(data, dtype=torch.float64).reshape(1, -1)
    mask = torch.tensor(mask_bits[: x.shape[1]]).reshape(1, -1)
    mask[0, :2] = True  # at least two valid entries
    sel = x[mask]
    assume(sel.var() > 1e-3)  # (near-)constant data: eps dominates the scale, nothing to normalise
    x = torch.where(mask, x, torch.tensor(pad_value, dtype=torch.float64))  # padding may hold anything
    out = masked_whiten(x, mask)
    assert torch.isfinite(out).all()
    assert abs(out[mask].mean().item()) < 1e-9
    # masked_whiten divides by sqrt(var + 1e-8), so the whitened variance is var / (var + 1e-8), not exactly 1
    # (for var = 0.0078 that is 1 - 1.28e-6; hypothesis found it)
    expected_var = sel.var().item() / (sel.var().item() + 1e-8)
    assert out[mask].var().item() == pytest.approx(expected_var, rel=1e-9)


def test_explained_variance_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    returns = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = returns + 0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    ref = explained_variance_score(returns[mask].numpy(), values[mask].numpy())
    assert explained_variance(values, returns, mask).item() == pytest.approx(ref, rel=1e-10)
    # perfect predictions -> 1
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    # constant returns: OpenAI baselines' explained_variance (transcribed) returns NaN; sklearn would give -inf
    const = torch.ones(3, 6, dtype=torch.float64)
    y, ypred = const[mask].numpy(), values[mask].numpy()
    vary = np.var(y)
    ref_const = np.nan if vary == 0 else 1 - np.var(y - ypred) / vary
    assert np.isnan(ref_const) and torch.isnan(explained_variance(values, const, mask))


def test_half_precision_accumulates_in_float32():
    x, mask = _batch(seed=5)
    xb = x.to(torch.bfloat16)
    out = masked_mean(xb, mask)
    assert out.dtype == torch.bfloat16
    ref = xb.double()[mask].mean()
    assert out.double().item() == pytest.approx(ref.item(), rel=1e-2)
