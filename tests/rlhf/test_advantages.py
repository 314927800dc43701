"""GAE / TD(lambda) against hand-derived numbers, a naive per-row loop, the forward-view lambda-return, and
the TD(0) / Monte-Carlo special cases; GRPO and RLOO baselines against TRL's formulas."""

import pytest
import torch
from trl.trainer.utils import nanstd

from lightning_llm.rlhf import (
    gae,
    group_relative_advantages,
    rloo_advantages,
    sequence_kl_penalized_scores,
    td_lambda_returns,
)


def _naive_gae_row(rewards, values, gamma, lam):
    """Textbook GAE over one episode given as Python lists (terminal after the last step)."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def _naive_gae(rewards, values, mask, gamma, lam):
    """Loop over rows; each row's episode is its valid positions in order (padding and holes are not steps)."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = mask[i].nonzero().flatten().tolist()
        a, r = _naive_gae_row([rewards[i, j].item() for j in idx], [values[i, j].item() for j in idx], gamma, lam)
        for k, j in enumerate(idx):
            adv[i, j], ret[i, j] = a[k], r[k]
    return adv, ret


def _lambda_return_forward_view(rewards, values, gamma, lam):
    """G^lam_t = (1-lam) sum_{n=1}^{N-t-1} lam^(n-1) G^(n)_t + lam^(N-t-1) G_t (Sutton & Barto eq. 12.3)."""
    n_steps = len(rewards)

    def n_step(t, n):
        g = sum(gamma**k * rewards[t + k] for k in range(n))
        return g + (gamma**n * values[t + n] if t + n < n_steps else 0.0)

    out = []
    for t in range(n_steps):
        horizon = n_steps - t
        g = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, horizon))
        out.append(g + lam ** (horizon - 1) * n_step(t, horizon))
    return out


def test_gae_hand_derived_three_steps_inside_padding():
    # gamma = 0.9, lam = 0.5, rewards (1, 0, 2), values (0.5, 1.0, 1.5), episode ends after step 3 (V = 0 beyond):
    #   delta_2 = 2 + 0.9*0   - 1.5 = 0.5        A_2 = 0.5
    #   delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35       A_1 = 0.35 + 0.45*0.5   = 0.575
    #   delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4        A_0 = 1.4  + 0.45*0.575 = 1.65875
    #   returns = A + V = (2.15875, 1.575, 2.0)
    # Row 0 has two prompt positions in front and one padding position after; row 1 is left padded.
    nan = float("nan")  # padding values are never read
    rewards = torch.tensor([[nan, 7.0, 1.0, 0.0, 2.0, 5.0], [nan, nan, nan, 1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[3.0, nan, 0.5, 1.0, 1.5, 9.0], [nan, 4.0, 4.0, 0.5, 1.0, 1.5]], dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    expected_adv = torch.tensor([1.65875, 0.575, 0.5], dtype=torch.float64)
    expected_ret = torch.tensor([2.15875, 1.575, 2.0], dtype=torch.float64)
    torch.testing.assert_close(adv[0, 2:5], expected_adv)
    torch.testing.assert_close(ret[0, 2:5], expected_ret)
    torch.testing.assert_close(adv[1, 3:], expected_adv)
    torch.testing.assert_close(ret[1, 3:], expected_ret)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def _random_batch(seed, b=7, t=12, holes=False):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    if holes:
        mask = torch.rand(b, t, generator=g) > 0.35
    else:
        starts = torch.randint(0, t // 2, (b,), generator=g)
        lengths = torch.randint(1, t, (b,), generator=g)
        pos = torch.arange(t)
        mask = (pos >= starts[:, None]) & (pos < starts[:, None] + lengths[:, None])
    return rewards, values, mask


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (0.8, 1.0), (0.0, 0.7)])
def test_gae_matches_naive_loop_with_padding(holes, gamma, lam):
    rewards, values, mask = _random_batch(seed=int(gamma * 100 + lam * 10), holes=holes)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    torch.testing.assert_close(td_lambda_returns(rewards, values, mask, gamma=gamma, lam=lam), ref_ret)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.7, 0.2)])
def test_returns_equal_forward_view_lambda_return(gamma, lam):
    rewards, values, mask = _random_batch(seed=11, b=3, t=8)
    ret = td_lambda_returns(rewards, values, mask, gamma=gamma, lam=lam)
    for i in range(3):
        idx = mask[i].nonzero().flatten().tolist()
        expected = _lambda_return_forward_view(rewards[i, idx].tolist(), values[i, idx].tolist(), gamma, lam)
        torch.testing.assert_close(ret[i, idx], torch.tensor(expected, dtype=torch.float64))


def test_td0_and_monte_carlo_special_cases():
    rewards, values, mask = _random_batch(seed=5, b=5, t=10)
    gamma = 0.9
    # TD(0): A_t = r_t + gamma * V_{t+1} - V_t, V_{t+1} = 0 at the last valid token (contiguous masks here)
    next_v = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(5, 1, dtype=torch.float64)], dim=1)
    td0 = torch.where(mask, rewards + gamma * next_v - values, 0.0)
    adv0, ret0 = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    torch.testing.assert_close(adv0, td0)
    torch.testing.assert_close(ret0, torch.where(mask, rewards + gamma * next_v, 0.0))
    # Monte Carlo: returns are the discounted reward-to-go and do not depend on the values
    adv1, ret1 = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for i in range(5):
        idx = mask[i].nonzero().flatten().tolist()
        r = rewards[i, idx].tolist()
        g = [sum(gamma**k * r[t + k] for k in range(len(r) - t)) for t in range(len(r))]
        torch.testing.assert_close(ret1[i, idx], torch.tensor(g, dtype=torch.float64))
    _, ret1_other_values = gae(rewards, torch.randn_like(values), mask, gamma=gamma, lam=1.0)
    torch.testing.assert_close(ret1, ret1_other_values)
    torch.testing.assert_close(adv1, torch.where(mask, ret1 - values, 0.0))


def test_gae_returns_no_grad_and_keeps_dtype():
    rewards, values, mask = _random_batch(seed=1, b=2, t=4)
    v = values.float().requires_grad_()
    adv, ret = gae(rewards.float(), v, mask)
    assert adv.dtype == torch.float32 and not adv.requires_grad and not ret.requires_grad


def test_gae_errors_name_the_argument():
    r = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    bad = r.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`rewards` contains non-finite"):
        gae(bad, r, m)
    with pytest.raises(ValueError, match="`values` contains non-finite"):
        gae(r, bad, m)
    m_pad = m.clone()
    m_pad[1, 2] = False
    gae(bad, bad, m_pad)  # NaN only on padding: fine
    with pytest.raises(ValueError, match="`values` must have the same shape as `rewards`"):
        gae(r, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, m, lam=-0.1)


def _trl_grpo(rewards, num_generations, scale):
    """Transcription of TRL GRPOTrainer's advantage (scale_rewards 'group' / 'none'), using TRL's nanstd."""
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    adv = rewards - mean_grouped
    return adv / (std + 1e-4) if scale else adv


def test_group_relative_advantages_hand_and_trl():
    # one group (1, 2, 6): mean 3, unbiased std sqrt((4 + 1 + 9) / 2) = sqrt(7)
    adv = group_relative_advantages(torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64) / (7**0.5 + 1e-4))
    scores = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(group_relative_advantages(scores, 4), _trl_grpo(scores, 4, True))
    torch.testing.assert_close(group_relative_advantages(scores, 3, normalize_std=False), _trl_grpo(scores, 3, False))
    assert torch.all(group_relative_advantages(scores, 1) == 0)


def test_rloo_hand_and_trl():
    # group (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> advantages -3, -1.5, 4.5
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 3.0, 4.0, 5.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, 0.0, 1.5]))
    scores = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grouped = scores.view(-1, 4)  # TRL RLOOTrainer: (grouped_sum - grouped) / (count - 1)
    trl_adv = scores - ((grouped.sum(1, keepdim=True) - grouped) / 3).view(-1)
    torch.testing.assert_close(rloo_advantages(scores, 4), trl_adv)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(scores, 1)
    with pytest.raises(ValueError, match="multiple of `group_size`"):
        group_relative_advantages(scores, 3)


def test_group_relative_advantages_scale_rewards_options():
    scores = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # TRL GRPOTrainer, scale_rewards="batch": group-mean-centred, divided by nanstd of the whole batch (+1e-4)
    centred = scores - scores.view(-1, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(
        group_relative_advantages(scores, 4, scale_rewards="batch"), centred / (nanstd(scores) + 1e-4)
    )
    torch.testing.assert_close(group_relative_advantages(scores, 4, scale_rewards="group"), _trl_grpo(scores, 4, True))
    torch.testing.assert_close(group_relative_advantages(scores, 4, scale_rewards="none"), centred)
    # a group with equal rewards gives zero advantages (no signal), not NaN
    flat = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert torch.equal(group_relative_advantages(flat, 3)[:3], torch.zeros(3))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_relative_advantages(scores, 4, scale_rewards="global")


def test_sequence_kl_penalized_scores_hand_values():
    # row 0: logp - ref = (0.5, -0.25) -> KL 0.25; row 1: one valid token 1.0 (the padded one is ignored)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 7.0]])
    ref = torch.tensor([[-1.5, -1.75], [-1.5, float("nan")]])
    mask = torch.tensor([[True, True], [True, False]])
    scores, kl = sequence_kl_penalized_scores(torch.tensor([1.0, 2.0]), logp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(scores, torch.tensor([1.0 - 0.025, 2.0 - 0.1]))
