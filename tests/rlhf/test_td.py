"""TD(0): the tabular update against hand-derived numbers, targets for a value network, and convergence on Sutton and
Barto's random walk (Example 6.2, true values 1/6 .. 5/6)."""

import pytest
import torch

from lightning_llm.rlhf import RANDOM_WALK_TRUE_VALUES, gae, random_walk_td0, td0_targets, td0_update_
from lightning_llm.rlhf.td import random_walk_episode


def test_td0_update_hand_values():
    v = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    # non-terminal: delta = 0 + 0.9 * 0.5 - 0.5 = -0.05; V[0] = 0.5 + 0.1 * -0.05 = 0.495
    assert td0_update_(v, 0, 0.0, 1, alpha=0.1, gamma=0.9) == pytest.approx(-0.05)
    assert float(v[0]) == pytest.approx(0.495)
    # terminal: delta = 1 - 0.5; V[2] = 0.5 + 0.5 * 0.5 = 0.75
    assert td0_update_(v, 2, 1.0, None, alpha=0.5) == pytest.approx(0.5)
    assert float(v[2]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="alpha"):
        td0_update_(v, 0, 0.0, 1, alpha=0.0)
    with pytest.raises(ValueError, match="next_state"):
        td0_update_(v, 0, 0.0, 3, alpha=0.1)


def test_td0_targets_equal_gae_lambda_zero_returns():
    # one 4-step episode: the TD(0) targets r_t + gamma V_{t+1} (0 after the end) are GAE's returns with lam = 0
    r = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.3, 0.1, -0.2, 0.7], dtype=torch.float64)
    next_v = torch.cat([v[1:], torch.zeros(1, dtype=torch.float64)])
    done = torch.tensor([False, False, False, True])
    targets = td0_targets(r, next_v.requires_grad_(), done, gamma=0.9)
    assert not targets.requires_grad
    _, returns = gae(r[None], v[None], torch.ones(1, 4, dtype=torch.bool), gamma=0.9, lam=0.0)
    torch.testing.assert_close(targets, returns[0])
    torch.testing.assert_close(targets, torch.tensor([0.5 + 0.09, -1.0 - 0.18, 2.0 + 0.63, 1.0], dtype=torch.float64))


def test_random_walk_episodes_start_in_the_middle_and_end_at_a_terminal():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ep = random_walk_episode(g)
        assert ep[0][0] == 2 and ep[-1][2] is None and all(s is not None for _, _, s in ep[:-1])
        assert ep[-1][1] == (1.0 if ep[-1][0] == 4 else 0.0)


def test_td0_converges_to_the_true_random_walk_values():
    values, rms = random_walk_td0(num_episodes=400, alpha=0.05, seed=0)
    start = float((torch.full((5,), 0.5, dtype=torch.float64) - RANDOM_WALK_TRUE_VALUES).square().mean().sqrt())
    assert rms[0] <= start + 0.05  # about 0.236 before learning
    late = sum(rms[-100:]) / 100
    assert late < 0.06 and late < start / 4
    assert torch.allclose(values, RANDOM_WALK_TRUE_VALUES, atol=0.12)
    assert torch.all(values[1:] > values[:-1])  # the ordering A < B < C < D < E is learned
