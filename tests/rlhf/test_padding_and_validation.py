"""Every function ignores padding: changing padded values (to garbage, inf or NaN) never changes any output or
sends a non-zero gradient back. Bad input gets a clear error naming the argument."""

import pytest
import torch

from lightning_llm.rlhf import (
    bradley_terry_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_entropy,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    sequence_logprobs,
    value_loss,
)

B, T, V = 4, 7, 9
_g = torch.Generator().manual_seed(0)
MASK = torch.tensor(
    [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [1, 0, 1, 1, 0, 0, 0]], dtype=torch.bool
)
X = {name: torch.randn(B, T, generator=_g, dtype=torch.float64) for name in ("a", "b", "c", "d")}
LOGITS = torch.randn(B, T, V, generator=_g, dtype=torch.float64)
TOKENS = torch.randint(0, V, (B, T), generator=_g)
SCORES = torch.randn(B, generator=_g, dtype=torch.float64)


def _corrupt(x: torch.Tensor, fill: float) -> torch.Tensor:
    pad = ~MASK if x.dim() == 2 else ~MASK[..., None].expand_as(x)
    return torch.where(pad, torch.full_like(x, fill), x)


CASES = {
    "masked_sum": lambda a, b, c, d, lg, tk: masked_sum(a, MASK),
    "masked_mean": lambda a, b, c, d, lg, tk: masked_mean(a, MASK, dim=1),
    "masked_var": lambda a, b, c, d, lg, tk: masked_var(a, MASK),
    "masked_whiten": lambda a, b, c, d, lg, tk: masked_whiten(a, MASK),
    "explained_variance": lambda a, b, c, d, lg, tk: explained_variance(a, b, MASK),
    "kl_penalized_rewards": lambda a, b, c, d, lg, tk: kl_penalized_rewards(SCORES, a, b, MASK, 0.1, kind="k3"),
    "gae": lambda a, b, c, d, lg, tk: gae(a, b, MASK, gamma=0.9, lam=0.8),
    "policy_loss": lambda a, b, c, d, lg, tk: policy_loss(a, b, c, MASK),
    "value_loss": lambda a, b, c, d, lg, tk: value_loss(a, b, c, MASK),
    "masked_entropy": lambda a, b, c, d, lg, tk: masked_entropy(lg, MASK),
    "entropy_from_logits(mask)": lambda a, b, c, d, lg, tk: entropy_from_logits(lg, mask=MASK),
    "sequence_logprobs": lambda a, b, c, d, lg, tk: sequence_logprobs(lg, tk, MASK, temperature=0.8, chunk_size=3),
}


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for o in out for t in _flatten(o)]


@pytest.mark.parametrize("fill", [1e6, -3.0, float("inf"), float("nan")])
@pytest.mark.parametrize("name", sorted(CASES))
def test_padding_never_changes_outputs(name, fill):
    fn = CASES[name]
    clean = _flatten(fn(X["a"], X["b"], X["c"], X["d"], LOGITS, TOKENS))
    tokens = torch.where(MASK, TOKENS, -100)  # ignore indices on padding
    dirty_args = [_corrupt(X[k], fill) for k in "abcd"] + [_corrupt(LOGITS, fill), tokens]
    dirty = _flatten(fn(*dirty_args))
    for c, d in zip(clean, dirty):
        torch.testing.assert_close(c, d, equal_nan=True)


@pytest.mark.parametrize("name", ["policy_loss", "value_loss", "masked_entropy", "sequence_logprobs", "masked_mean"])
def test_padding_gets_zero_finite_gradient(name):
    a = _corrupt(X["a"], float("nan")).requires_grad_()
    lg = _corrupt(LOGITS, float("nan")).requires_grad_()
    out = _flatten(CASES[name](a, X["b"], X["c"], X["d"], lg, torch.where(MASK, TOKENS, -100)))[0]
    out.sum().backward()
    for leaf in (a, lg):
        if leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all()
            pad = ~MASK if leaf.dim() == 2 else ~MASK[..., None].expand_as(leaf)
            assert (leaf.grad[pad] == 0).all()


def test_errors_name_the_argument_and_the_fix():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        masked_mean([[1.0]], torch.ones(1, 1))
    with pytest.raises(TypeError, match="`x` must be a floating-point"):
        masked_mean(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(2, 3\)"):
        masked_mean(x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_mean(x, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError, match="bool tensor"):
        masked_mean(x, torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="`old_logp` must have the same shape as `logp`"):
        policy_loss(x, torch.zeros(2, 4), x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="`advantages` contains non-finite"):
        policy_loss(x, x, torch.full((2, 3), float("nan")), torch.ones(2, 3))
    with pytest.raises(ValueError, match="`returns` contains non-finite"):
        value_loss(x, x, torch.full((2, 3), float("inf")), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(x, x, x, torch.ones(2, 3), clip_eps=0.0)
    with pytest.raises(ValueError, match=r"`kind` must be one of \['k1', 'k2', 'k3'\]"):
        kl_estimate(x, x, kind="k4")
    with pytest.raises(ValueError, match="`scores` must have one entry per row"):
        kl_penalized_rewards(torch.zeros(3), x, x, torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="`margin` contains non-finite"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.tensor([0.0, float("nan")]))
