"""Token log-probabilities and entropies against TRL's utilities, torch.distributions and cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits
from trl.trainer.utils import selective_log_softmax

from lightning_llm.rlhf import entropy_from_logits, masked_entropy, sequence_logprob_sum, sequence_logprobs


def _case(seed=0, b=5, t=6, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return logits, tokens, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 2, 8])
def test_sequence_logprobs_matches_trl_selective_log_softmax(temperature, chunk_size):
    logits, tokens, mask = _case()
    ours = sequence_logprobs(logits, tokens, mask, temperature=temperature, chunk_size=chunk_size)
    ref = selective_log_softmax(logits, tokens, temperature=temperature)
    torch.testing.assert_close(ours, torch.where(mask, ref, 0.0))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(sequence_logprob_sum(logits, tokens, mask, temperature), ours.sum(1))


def test_sequence_logprobs_matches_cross_entropy_of_a_causal_lm_shift():
    # logits for input_ids (B, L, V): score input_ids[:, 1:] with logits[:, :-1]; labels -100 on prompt / padding
    logits, input_ids, _ = _case(seed=1, t=7)
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    mask = labels[:, 1:] != -100
    lp = sequence_logprobs(logits[:, :-1], labels[:, 1:], mask)  # -100 on masked positions is never read
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert (-lp.sum() / mask.sum()).item() == pytest.approx(ce.item(), rel=1e-6)


def test_sequence_logprobs_bf16_is_computed_in_float32_and_differentiable():
    logits, tokens, mask = _case(seed=2)
    lb = logits.to(torch.bfloat16).requires_grad_()
    out = sequence_logprobs(lb, tokens, mask)
    assert out.dtype == torch.float32
    ref = torch.where(mask, torch.log_softmax(lb.detach().double(), -1).gather(-1, tokens[..., None])[..., 0], 0.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(lb.grad.float()).all() and (lb.grad[~mask] == 0).all()


def test_sequence_logprobs_token_errors():
    logits, tokens, mask = _case()
    bad = tokens.clone()
    bad[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = 11
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        sequence_logprobs(logits, bad, mask)
    with pytest.raises(TypeError, match="integer tensor"):
        sequence_logprobs(logits, tokens.float(), mask)
    with pytest.raises(ValueError, match=r"logits\[:, :-1\]"):
        sequence_logprobs(logits, tokens[:, 1:], None)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(logits, tokens, mask, temperature=0.0)


def test_entropy_matches_torch_distributions_and_trl():
    logits, _, mask = _case(seed=3)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=7), ref)
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy_from_logits(logits, chunk_size=4))
    ref_t = torch.distributions.Categorical(logits=logits / 0.5).entropy()
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.5), ref_t)
    # masked mean over valid tokens only
    torch.testing.assert_close(masked_entropy(logits, mask), ref[mask].mean())


def test_entropy_hand_values_and_extremes():
    # uniform over V = 8 -> log 8; one-hot-like logits (gap 1e4) -> 0 without NaN
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    extreme = torch.tensor([[1e4, 0.0, -1e4, 0.0]])
    assert entropy_from_logits(extreme).item() == pytest.approx(0.0, abs=1e-6)
    # two equally likely tokens -> log 2, also for bf16 input
    two = torch.tensor([[5.0, 5.0, -1e4]], dtype=torch.bfloat16)
    out = entropy_from_logits(two)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(math.log(2), rel=1e-6)
