"""KL estimators, KL-penalised rewards and KL controllers against hand-derived values and torch.distributions."""

import io
import math

import pytest
import torch

from lightning_llm.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
    last_valid_index,
)


def test_kl_estimators_hand_values():
    # token 0: logp=-1, ref=-2 -> logr=-1: k1=1, k2=0.5, k3=e^-1 - 1 + 1 = e^-1
    # token 1: logp=-2, ref=-1 -> logr=+1: k1=-1, k2=0.5, k3=e - 1 - 1 = e - 2
    # token 2: logp=ref -> 0 for every estimator
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1.0, -0.3], dtype=torch.float64)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        kl_estimate(logp, ref, "k3"), torch.tensor([math.exp(-1), math.e - 2, 0.0], dtype=torch.float64)
    )


def test_k1_k3_are_unbiased_under_the_policy():
    # E_{x~p}[k(x)] summed exactly over a categorical equals KL(p || q) for k1 and k3 (Schulman 2020)
    g = torch.Generator().manual_seed(0)
    p = torch.distributions.Categorical(logits=torch.randn(11, generator=g, dtype=torch.float64))
    q = torch.distributions.Categorical(logits=torch.randn(11, generator=g, dtype=torch.float64))
    ref_kl = torch.distributions.kl_divergence(p, q)
    logp, logq = p.logits, q.logits  # normalised log-probabilities
    for kind in ("k1", "k3"):
        expected = (p.probs * kl_estimate(logp, logq, kind)).sum()
        torch.testing.assert_close(expected, ref_kl)
    k2 = kl_estimate(logp, logq, "k2")
    assert (k2 >= 0).all() and (kl_estimate(logp, logq, "k3") >= 0).all()


def _naive_rewards(scores, logp, ref, mask, coef):
    """Per-row Python loop: -coef * (logp - ref) on valid tokens (k1), score added at the last valid position."""
    b, t = len(logp), len(logp[0])
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        valid = [j for j in range(t) if mask[i][j]]
        for j in valid:
            out[i][j] = -coef * (logp[i][j] - ref[i][j])
        out[i][valid[-1]] += scores[i]
    return torch.tensor(out, dtype=torch.float64)


def test_kl_penalized_rewards_hand_example():
    # row 0: prompt zeros at 0-1, response at 2-3, padding at 4; row 1: left padding, response 2-4.
    # coef 0.1, k1: row 0 -> [0, 0, -0.1*(−1 − −1.5), -0.1*(−2 − −1) + 3, 0] = [0, 0, -0.05, 0.1 + 3, 0]
    scores = torch.tensor([3.0, -1.0], dtype=torch.float64)
    logp = torch.tensor([[9.0, 9.0, -1.0, -2.0, 9.0], [9.0, 9.0, -0.5, -0.5, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[7.0, 7.0, -1.5, -1.0, 7.0], [7.0, 7.0, -0.5, -1.5, -0.25]], dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards[0], torch.tensor([0, 0, -0.05, 3.1, 0], dtype=torch.float64))
    # row 1: k1 = [0, 1, -0.25] -> rewards [0, -0.1, 0.025 - 1]
    torch.testing.assert_close(rewards[1], torch.tensor([0, 0, 0, -0.1, 0.025 - 1], dtype=torch.float64))
    torch.testing.assert_close(kl[1], torch.tensor([0, 0, 0, 1.0, -0.25], dtype=torch.float64))
    torch.testing.assert_close(
        rewards, _naive_rewards(scores.tolist(), logp.tolist(), ref.tolist(), mask.tolist(), 0.1)
    )


def test_kl_penalized_rewards_random_vs_naive_and_estimators():
    g = torch.Generator().manual_seed(2)
    b, t = 6, 9
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(b, t, generator=g) > 0.4
    mask[:, 0] = True
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=torch.tensor(0.2))
    ref_r = _naive_rewards(scores.tolist(), logp.tolist(), ref.tolist(), mask.tolist(), 0.2)
    torch.testing.assert_close(rewards, ref_r)
    for kind in ("k2", "k3"):
        r_k, kl_k = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.2, kind=kind)
        torch.testing.assert_close(kl_k, torch.where(mask, kl_estimate(logp, ref, kind), 0.0))
        torch.testing.assert_close(r_k.sum(1), scores - 0.2 * kl_k.sum(1))


def test_last_valid_index_and_empty_rows():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0]])
    assert last_valid_index(mask).tolist() == [1, 3, 3, 0]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        kl_penalized_rewards(
            torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1
        )


def test_kl_penalized_rewards_rejects_nan_scores_by_name():
    with pytest.raises(ValueError, match="`scores` contains non-finite"):
        kl_penalized_rewards(
            torch.tensor([1.0, float("nan")]), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.1
        )
    with pytest.raises(ValueError, match="kl_coef"):
        kl_penalized_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), -0.1)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_hand_values():
    # init 0.1, target 6, horizon 10000, n_steps 100 (n/h = 0.01):
    # KL 9   -> error  0.5 clipped to  0.2 -> 0.1 * 1.002
    # KL 3   -> error -0.5 clipped to -0.2 -> * 0.998
    # KL 6.6 -> error  0.1               -> * 1.001
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 100)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    ctl.update(torch.tensor(3.0), 100)
    assert ctl.value == pytest.approx(0.1 * 1.002 * 0.998)
    ctl.update(6.6, 100)
    assert ctl.value == pytest.approx(0.1 * 1.002 * 0.998 * 1.001)


def test_adaptive_controller_checkpoint_roundtrip():
    kls = [9.0, 2.0, 7.0, 6.5, 1.0, 12.0]
    straight = AdaptiveKLController(0.05, target=6.0, horizon=1000)
    for kl in kls:
        straight.update(kl, 32)
    first = AdaptiveKLController(0.05, target=6.0, horizon=1000)
    for kl in kls[:3]:
        first.update(kl, 32)
    buf = io.BytesIO()
    torch.save({"kl_ctl": first.state_dict()}, buf)  # as a LightningModule would in on_save_checkpoint
    buf.seek(0)
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["kl_ctl"])
    for kl in kls[3:]:
        resumed.update(kl, 32)
    assert resumed.value == straight.value
    assert (resumed.target, resumed.horizon) == (6.0, 1000.0)


def test_controller_errors():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="current_kl"):
        AdaptiveKLController().update(float("nan"), 1)
    with pytest.raises(KeyError, match="horizon"):
        AdaptiveKLController().load_state_dict({"value": 1.0, "target": 1.0})
