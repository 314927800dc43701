"""Perplexity / BitsPerByte against exp(F.cross_entropy), torchmetrics' Perplexity, float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_llm.metrics import BitsPerByte, Perplexity
from lightning_llm.metrics.functional import bits_per_byte, perplexity, perplexity_from_logprobs, token_nll


def _reference_ppl(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Independent reference: cross-entropy in float64 on the whole tensor."""
    return torch.exp(F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), ignore_index=ignore_index))


@pytest.mark.parametrize("ignore_index", [None, -100, 3])
def test_matches_cross_entropy_and_torchmetrics(ignore_index):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    target = torch.randint(11, (3, 7))
    if ignore_index is not None:
        target[0, 4:] = ignore_index
    ref_ce = torch.exp(
        F.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=-100 if ignore_index is None else ignore_index
        )
    )
    tm = torchmetrics.text.Perplexity(ignore_index=ignore_index)(logits, target)
    ours = perplexity(logits, target, ignore_index=ignore_index)
    torch.testing.assert_close(ours, ref_ce.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.float(), tm, rtol=1e-5, atol=0)
    metric = Perplexity(ignore_index=ignore_index)
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    torch.testing.assert_close(metric.compute(), ours, rtol=1e-12, atol=0)


def test_large_logit_gaps_stay_finite_where_torchmetrics_overflows():
    # A gap of 200 nats: softmax underflows to 0 for the target and torchmetrics returns inf.
    logits = torch.zeros(1, 2, 5)
    logits[0, 0, 0] = 200.0  # target 1 at t=0 has log-prob exactly -200 - log(1 + 4 e^-200) ~= -200
    logits[0, 1, 2] = 150.0  # target 2 at t=1 has log-prob ~= 0
    target = torch.tensor([[1, 2]])
    assert torch.isinf(torchmetrics.text.Perplexity()(logits, target))
    ours = perplexity(logits, target)
    # hand-derived: mean NLL = (200 + 0) / 2 = 100 -> ppl = e^100
    assert math.isfinite(ours.item())
    torch.testing.assert_close(ours, torch.tensor(math.exp(100.0), dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_upcast(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(2, 6, 50) * 30).to(dtype)  # gaps far beyond float16's safe softmax range
    target = torch.randint(50, (2, 6))
    ref = _reference_ppl(logits, target)  # float64 on the same rounded values
    ours = perplexity(logits, target)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


def test_float64_logits_computed_in_float64():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 9, dtype=torch.float64)
    target = torch.randint(9, (2, 5))
    nll, valid = token_nll(logits, target)
    assert nll.dtype == torch.float64 and valid.all()
    torch.testing.assert_close(perplexity(logits, target), _reference_ppl(logits, target), rtol=1e-13, atol=0)


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 13, 4 * 13 * 5, 1 << 30])
def test_chunking_invariance(chunk_bytes):
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 13)
    target = torch.randint(13, (3, 5))
    target[1, 2] = -100
    ref = perplexity(logits, target, ignore_index=-100, chunk_bytes=1 << 30)  # one chunk
    ours = perplexity(logits, target, ignore_index=-100, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, _reference_ppl(logits, target), rtol=1e-6, atol=0)


def test_non_contiguous_logits():
    torch.manual_seed(4)
    logits = torch.randn(7, 3, 9).transpose(0, 1)  # (3, 7, 9), non-contiguous
    target = torch.randint(9, (3, 7))
    torch.testing.assert_close(
        perplexity(logits, target, chunk_bytes=40), _reference_ppl(logits, target), rtol=1e-6, atol=0
    )


def test_gradient_matches_cross_entropy():
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    target = torch.randint(6, (2, 4))
    perplexity(logits, target, chunk_bytes=4 * 6 * 3).backward()
    ours = logits.grad.clone()
    logits.grad = None
    torch.exp(F.cross_entropy(logits.flatten(0, 1), target.flatten()).double()).backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-5, atol=1e-7)


def test_logprobs_api_matches_logits_api():
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 7)
    target = torch.randint(7, (2, 5))
    mask = torch.rand(2, 5) > 0.3
    mask[0, 0] = True
    lp = torch.log_softmax(logits.double(), -1).gather(-1, target[..., None]).squeeze(-1)
    lp_garbage = torch.where(mask, lp, torch.full_like(lp, float("nan")))  # padding may hold anything
    ref = perplexity(logits, torch.where(mask, target, -100), ignore_index=-100)
    torch.testing.assert_close(perplexity_from_logprobs(lp_garbage, mask), ref, rtol=1e-6, atol=0)
    metric = Perplexity()
    metric.update(logprobs=lp_garbage, mask=mask)
    torch.testing.assert_close(metric.compute(), ref, rtol=1e-6, atol=0)


def test_count_is_exact_past_2_pow_24():
    # torchmetrics keeps a float32 count: 2^24 + 1 == 2^24 in float32. Ours is int64.
    metric = Perplexity()
    metric.count += 2**24
    metric.nll_sum += 0.0
    metric.update(logprobs=torch.zeros(1, 1))
    assert metric.count.item() == 2**24 + 1 and metric.count.dtype == torch.int64
    assert metric.nll_sum.dtype == torch.float64


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_forward_update_compute_reset():
    torch.manual_seed(7)
    logits, target = torch.randn(4, 3, 5), torch.randint(5, (4, 3))
    metric = Perplexity()
    batch_val = metric(logits[:2], target[:2])  # forward returns the batch value and accumulates
    torch.testing.assert_close(batch_val, _reference_ppl(logits[:2], target[:2]), rtol=1e-6, atol=0)
    metric(logits[2:], target[2:])
    torch.testing.assert_close(metric.compute(), _reference_ppl(logits, target), rtol=1e-6, atol=0)
    metric.reset()
    assert metric.count.item() == 0 and metric.nll_sum.item() == 0.0
    with pytest.raises(ValueError, match="count = 0"):
        metric.compute()
    assert Perplexity.full_state_update is False and Perplexity.higher_is_better is False


def test_bits_per_byte():
    torch.manual_seed(8)
    logits, target = torch.randn(2, 4, 9), torch.randint(9, (2, 4))
    nll_sum = F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), reduction="sum")
    ref = nll_sum.item() / (math.log(2) * 21)  # definition: nats -> bits, per byte
    metric = BitsPerByte()
    metric.update(logits[:1], target[:1], num_bytes=torch.tensor([13]))
    metric.update(logits[1:], target[1:], 8)
    assert math.isclose(metric.compute().item(), ref, rel_tol=1e-6)
    assert math.isclose(bits_per_byte(nll_sum, 21).item(), ref, rel_tol=1e-12)
    with pytest.raises(ValueError, match="num_bytes"):
        metric.update(logits, target)
    with pytest.raises(TypeError, match="num_bytes"):
        metric.update(logits, target, num_bytes=2.5)
    with pytest.raises(ValueError, match="num_bytes = 0"):
        bits_per_byte(1.0, 0)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("logits", "target", "exc", "match"),
    [
        (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long), ValueError, r"`logits` must have shape \(B, T, V\)"),
        (torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long), ValueError, r"`target` must have shape \(B, T\)"),
        (torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ValueError, "input_ids\\[:, 1:\\]"),
        (torch.ones(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), TypeError, "floating-point"),
        (torch.randn(2, 3, 4), torch.zeros(2, 3), TypeError, "integer token ids"),
        (torch.randn(2, 3, 4), torch.full((2, 3), 4), ValueError, r"outside the vocabulary \[0, 4\)"),
        (torch.randn(2, 3, 4), torch.full((2, 3), -100), ValueError, "set ignore_index=-100"),
        (torch.full((1, 1, 4), float("nan")), torch.zeros(1, 1, dtype=torch.long), ValueError, "NaN"),
        (torch.tensor([[[float("inf"), 0.0]]]), torch.zeros(1, 1, dtype=torch.long), ValueError, "non-finite"),
        (torch.tensor([[[float("-inf"), 0.0]]]), torch.zeros(1, 1, dtype=torch.long), ValueError, "logit is -inf"),
    ],
)
def test_bad_input_errors(logits, target, exc, match):
    with pytest.raises(exc, match=match):
        perplexity(logits, target)
    with pytest.raises(exc, match=match):
        Perplexity().update(logits, target)


def test_neg_inf_off_target_is_allowed_and_nan_in_ignored_rows_is_ignored():
    logits = torch.tensor([[[float("-inf"), 0.0, 0.0], [float("nan")] * 3]])
    target = torch.tensor([[1, -100]])
    # hand-derived: token 1 has probability 1/2 among the two finite logits -> ppl 2
    torch.testing.assert_close(perplexity(logits, target, ignore_index=-100), torch.tensor(2.0, dtype=torch.float64))


def test_other_argument_errors():
    with pytest.raises(ValueError, match="ignore_index"):
        Perplexity(ignore_index=1.5)
    with pytest.raises(ValueError, match="not both"):
        Perplexity().update(torch.randn(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), logprobs=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="log-probabilities"):
        perplexity_from_logprobs(torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        perplexity_from_logprobs(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="same shape"):
        perplexity_from_logprobs(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="count = 0"):
        perplexity(torch.randn(1, 2, 3), torch.full((1, 2), -100), ignore_index=-100)
    with pytest.raises(ValueError, match="chunk_bytes"):
        perplexity(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), chunk_bytes=0)


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 5),
    v=st.integers(1, 12),
    scale=st.sampled_from([1.0, 50.0, 1e3]),
    shift=st.floats(-1e3, 1e3),
    chunk=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_property_shift_invariance_chunking_and_bounds(b, t, v, scale, shift, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    target = torch.randint(v, (b, t), generator=g)
    ref = _reference_ppl(logits, target)
    ours = perplexity(logits.float(), target, chunk_bytes=chunk * 4)
    shifted = perplexity(logits + shift, target, chunk_bytes=chunk * 8)  # log-softmax is shift-invariant per row
    assert torch.isfinite(ours) or torch.isinf(ref)  # finite unless the true value overflows float64
    if torch.isfinite(ref):
        torch.testing.assert_close(shifted.log(), ref.log(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.log(), ref.log(), rtol=1e-5, atol=1e-4 * scale)
    assert ours.item() >= 1.0 - 1e-6  # every log-prob <= 0
    if scale == 1.0:
        assert ours.item() <= float(v) * math.exp(2 * 6.0)  # crude upper bound for |logit| <= 6 sigma


def test_float64_states_survive_module_to_dtype():
    # Lightning's precision="bf16-true" calls module.to(torch.bfloat16) on the LightningModule, metrics included;
    # torchmetrics only guards .half()/.float(), so a float64 NLL sum would otherwise become bfloat16.
    metric = Perplexity().to(torch.bfloat16)
    assert metric.nll_sum.dtype == torch.float64 and metric.count.dtype == torch.int64
    metric.update(logprobs=torch.full((1, 3), -1e-4, dtype=torch.bfloat16).float())
    assert metric.nll_sum.dtype == torch.float64
    metric = BitsPerByte().half()
    assert metric.nll_sum.dtype == torch.float64
