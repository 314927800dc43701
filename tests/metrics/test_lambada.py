"""LambadaAccuracy against a naive per-example loop (lm-evaluation-harness's logic) and hand-derived values."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_llm.metrics import LambadaAccuracy
from lightning_llm.metrics.functional import lambada_accuracy, lambada_update


def _harness_loop(logits, target, ignore_index=-100):
    """Per example, as lm-evaluation-harness's loglikelihood: log_softmax, greedy check, gather, sum."""
    correct, logprobs = [], []
    for b in range(logits.shape[0]):
        pos = [t for t in range(target.shape[1]) if int(target[b, t]) != ignore_index]
        lp = F.log_softmax(logits[b, pos].double(), dim=-1)  # (n_target, V)
        cont = target[b, pos]
        correct.append(bool((lp.argmax(-1) == cont).all()))
        logprobs.append(float(lp.gather(1, cont[:, None]).sum()))
    acc = sum(correct) / len(correct)
    mean_nll = -sum(logprobs) / len(logprobs)
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
    return correct, logprobs, acc, ppl


def _batch(seed, b=5, t=6, v=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    target = torch.full((b, t), -100)
    for i in range(b):
        n = int(torch.randint(1, 3, (1,), generator=g))  # 1-2 target tokens at the end of a varying context
        end = t - int(torch.randint(0, 2, (1,), generator=g))  # some rows right-padded by one
        target[i, end - n : end] = torch.randint(v, (n,), generator=g)
    # make some examples greedy-correct
    for i in range(0, b, 2):
        pos = (target[i] != -100).nonzero().squeeze(1)
        logits[i, pos, target[i, pos]] += 20.0
    return logits, target


def test_matches_naive_loop():
    logits, target = _batch(0)
    correct, logprob = lambada_update(logits, target)
    ref_correct, ref_lp, ref_acc, ref_ppl = _harness_loop(logits, target)
    assert correct.tolist() == ref_correct
    torch.testing.assert_close(logprob, torch.tensor(ref_lp, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    metric = LambadaAccuracy()
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    out = metric.compute()
    assert out["acc"].item() == ref_acc
    assert math.isclose(out["ppl"].item(), ref_ppl, rel_tol=1e-6)
    func = lambada_accuracy(logits, target)
    assert func["acc"].item() == ref_acc and math.isclose(func["ppl"].item(), ref_ppl, rel_tol=1e-6)


def test_hand_derived_values():
    # Example 0: two target tokens, each with logits [0, ln 3, 0] over V=3 -> p(target=1) = 3/5 and greedy.
    # Example 1: one target token 0 with uniform logits -> p = 1/3, argmax is token 0 (first max) -> correct.
    # Example 2: one target token 2 with uniform logits -> p = 1/3, argmax 0 != 2 -> wrong.
    logits = torch.zeros(3, 3, 3)
    logits[0, 1, 1] = logits[0, 2, 1] = math.log(3.0)
    target = torch.tensor([[-100, 1, 1], [-100, -100, 0], [-100, 2, -100]])
    correct, logprob = lambada_update(logits, target)
    assert correct.tolist() == [True, True, False]
    expected = [2 * math.log(3 / 5), math.log(1 / 3), math.log(1 / 3)]
    torch.testing.assert_close(logprob, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    out = lambada_accuracy(logits, target)
    assert math.isclose(out["acc"].item(), 2 / 3, rel_tol=1e-12)
    # per-example mean, not per-token: exp(-(2 ln .6 + 2 ln 1/3) / 3)
    assert math.isclose(out["ppl"].item(), math.exp(-sum(expected) / 3), rel_tol=1e-6)
    per_token = math.exp(-sum(expected) / 4)
    assert not math.isclose(out["ppl"].item(), per_token, rel_tol=1e-3)


def test_chunking_and_low_precision():
    logits, target = _batch(1, b=4, t=5, v=11)
    ref = lambada_update(logits, target)
    for chunk in (1, 44, 1 << 30):
        c, lp = lambada_update(logits, target, chunk_bytes=chunk)
        assert c.tolist() == ref[0].tolist()
        torch.testing.assert_close(lp, ref[1], rtol=1e-12, atol=1e-12)
    half = logits.to(torch.bfloat16)
    _, _, _, ppl = _harness_loop(half, target)
    assert math.isclose(lambada_accuracy(half, target)["ppl"].item(), ppl, rel_tol=1e-5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_forward_reset_and_errors():
    logits, target = _batch(2)
    metric = LambadaAccuracy()
    batch = metric(logits[:3], target[:3])
    assert batch["acc"].item() == _harness_loop(logits[:3], target[:3])[2]
    metric.reset()
    with pytest.raises(ValueError, match="n = 0"):
        metric.compute()
    with pytest.raises(ValueError, match="at least one target token"):
        lambada_update(torch.randn(2, 3, 4), torch.tensor([[-100, -100, 1], [-100, -100, -100]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lambada_update(torch.randn(1, 2, 4), torch.tensor([[-100, 9]]))
    with pytest.raises(TypeError, match="floating-point"):
        lambada_update(torch.ones(1, 2, 4, dtype=torch.int32), torch.tensor([[-100, 1]]))
    with pytest.raises(ValueError, match="non-finite"):
        lambada_update(torch.full((1, 2, 4), float("nan")), torch.tensor([[-100, 1]]))
    with pytest.raises(ValueError, match="ignore_index"):
        LambadaAccuracy(ignore_index=None)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 4), v=st.integers(2, 9), scale=st.sampled_from([0.1, 5.0, 300.0]))
def test_property_matches_loop(seed, b, v, scale):
    logits, target = _batch(seed, b=b, t=4, v=v)
    logits = logits * scale
    correct, logprob = lambada_update(logits, target)
    ref_correct, ref_lp, _, _ = _harness_loop(logits, target)
    assert correct.tolist() == ref_correct
    torch.testing.assert_close(logprob, torch.tensor(ref_lp, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    assert (logprob <= 0).all()
