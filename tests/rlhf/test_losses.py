"""PPO policy / value losses, DPO / IPO and Bradley-Terry against hand-derived values and TRL's formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_llm.rlhf import bradley_terry_loss, dpo_loss, policy_loss, value_loss

# ---------------------------------------------------------------- PPO policy loss


def _policy_case():
    # four valid tokens and one padded one; ratios 1.5, 0.5, 1.1, 1.0 with advantages 1, -1, 2, 3, eps = 0.2:
    #   tok0: -A*r = -1.5, -A*clip = -1.2 -> max -1.2 (clipped active)
    #   tok1: -A*r =  0.5, -A*clip =  0.8 -> max  0.8 (clipped active)
    #   tok2: -A*r = -2.2, -A*clip = -2.2 -> -2.2 (inside the range: not counted as clipped)
    #   tok3: -3, -3 -> -3
    #   loss = (-1.2 + 0.8 - 2.2 - 3) / 4 = -1.4, clipfrac = 2/4
    #   approx_kl (k3 = r - 1 - log r): (0.5 - ln 1.5) + (-0.5 + ln 2) + (0.1 - ln 1.1) + 0, over 4
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0, 0.0]], dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.0, 1e6]], dtype=torch.float64)
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_policy_loss_hand_values_and_gradient():
    logp, old, adv, mask = _policy_case()
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    k3 = (0.5 - math.log(1.5)) + (-0.5 + math.log(2)) + (0.1 - math.log(1.1))
    assert stats["approx_kl"].item() == pytest.approx(k3 / 4)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 1.0) / 4)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    # clipped tokens get no gradient; unclipped ones d(-A*r)/dlogp / N = -A*r/4; padding exactly 0
    expected = torch.tensor([[0.0, 0.0, -2.0 * 1.1 / 4, -3.0 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def _naive_policy_loss(logp, old, adv, mask, eps_low, eps_high):
    terms, clipped = [], []
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if mask[i, j]:
                r = math.exp(logp[i, j].item() - old[i, j].item())
                a = adv[i, j].item()
                u, c = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
                terms.append(max(u, c))
                clipped.append(float(c > u))
    return sum(terms) / len(terms), sum(clipped) / len(clipped)


def test_policy_loss_random_vs_naive_and_broadcast_advantages():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    logp = old + 0.4 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    for eps_high in (None, 0.28):
        loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high)
        ref_loss, ref_clip = _naive_policy_loss(logp, old, adv, mask, 0.2, 0.2 if eps_high is None else eps_high)
        assert loss.item() == pytest.approx(ref_loss)
        assert stats["clipfrac"].item() == pytest.approx(ref_clip)
    seq_adv = torch.randn(4, generator=g, dtype=torch.float64)
    loss_1d, _ = policy_loss(logp, old, seq_adv, mask)
    loss_2d, _ = policy_loss(logp, old, seq_adv[:, None].expand(4, 6).clone(), mask)
    torch.testing.assert_close(loss_1d, loss_2d)


# ---------------------------------------------------------------- PPO value loss


def test_value_loss_hand_values():
    # eps 0.2; (V, V_old, R):
    #   (1.5, 1.0, 2.0): unclipped 0.25, clipped V=1.2 -> 0.64 -> 0.64 (clipped larger)
    #   (0.5, 1.0, 0.0): unclipped 0.25, clipped V=0.8 -> 0.64 -> 0.64 (clipped larger)
    #   (1.1, 1.0, 1.0): 0.01 both
    #   (3.0, 1.0, 3.0): unclipped 0,    clipped V=1.2 -> 3.24 -> 3.24 (clipped larger)
    #   (0.9, 1.0, 2.0): 1.21 both
    #   loss = 0.5 * (0.64 + 0.64 + 0.01 + 3.24 + 1.21) / 5 = 0.574, clipfrac 3/5
    #   without clipping: 0.5 * (0.25 + 0.25 + 0.01 + 0 + 1.21) / 5 = 0.172
    v = torch.tensor([[1.5, 0.5, 1.1, 3.0, 0.9, 42.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, -42.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 0.0, 1.0, 3.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, clipfrac = value_loss(v, old, ret, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.574)
    assert clipfrac.item() == pytest.approx(0.6)
    loss.backward()
    # gradient only through the tokens where the unclipped term is active: (V - R) / 5 (the 0.5 cancels the 2)
    torch.testing.assert_close(v.grad, torch.tensor([[0, 0, 0.1 / 5, 0, -1.1 / 5, 0]], dtype=torch.float64))
    loss_nc, clip_nc = value_loss(v, old, ret, mask, clip_eps=None)
    assert loss_nc.item() == pytest.approx(0.172) and clip_nc.item() == 0.0


# ---------------------------------------------------------------- DPO / IPO


def _trl_dpo_reference(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0, lc=None, lr=None):
    """Transcribed from TRL: 1.x ``DPOTrainer._compute_loss`` ('sigmoid', 'ipo' with length normalisation) and
    0.x ``DPOTrainer.dpo_loss`` ('sigmoid' with label_smoothing, i.e. cDPO)."""
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    if loss_type == "sigmoid":
        logits = chosen_logratios - rejected_logratios
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        if lc is not None:
            ipo_delta = chosen_logratios / lc.clamp(min=1.0) - rejected_logratios / lr.clamp(min=1.0)
        else:
            ipo_delta = chosen_logratios - rejected_logratios
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def test_dpo_hand_values():
    # h = (logp_c - ref_c) - (logp_r - ref_r) = (-5 - -6) - (-7 - -6) = 2; beta 0.1
    # sigmoid: -logsigmoid(0.2) = log(1 + e^-0.2); IPO: (2 - 1/0.2)^2 = 9
    args = [torch.tensor([x], dtype=torch.float64) for x in (-5.0, -7.0, -6.0, -6.0)]
    loss, cr, rr = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    loss_ipo, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert loss_ipo.item() == pytest.approx(9.0)


@pytest.mark.parametrize(
    ("loss_type", "ls", "lengths"),
    [("sigmoid", 0.0, False), ("sigmoid", 0.2, False), ("ipo", 0.0, False), ("ipo", 0.0, True)],
)
def test_dpo_matches_trl(loss_type, ls, lengths):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(8, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    pc.requires_grad_()
    lc = torch.randint(1, 20, (8,), generator=g).double() if lengths else None
    lr = torch.randint(0, 20, (8,), generator=g).double() if lengths else None
    ours = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.3,
        loss_type=loss_type,
        label_smoothing=ls,
        chosen_lengths=lc,
        rejected_lengths=lr,
        reduction="none",
    )
    ref = _trl_dpo_reference(pc, pr, rc, rr, 0.3, loss_type, ls, lc, lr)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    mean_loss, _, _ = dpo_loss(
        pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=ls, chosen_lengths=lc, rejected_lengths=lr
    )
    torch.testing.assert_close(mean_loss, ref[0].mean())
    mean_loss.backward()
    if loss_type == "sigmoid" and ls == 0.0:
        assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the DPO loss (cDPO may not: target 1 - ls)


def test_dpo_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="`ref_rejected_logp` must have the same shape"):
        dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="`policy_rejected_logp` contains non-finite"):
        dpo_loss(x, torch.tensor([0.0, float("nan"), 0.0]), x, x)


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_values():
    # (2, 1): -logsigmoid(1) = log(1 + e^-1); with margin 1: -logsigmoid(0) = log 2
    # (0, 3): -logsigmoid(-3) = log(1 + e^3); tie (1, 1): log 2 and counts as wrong
    rc = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    rr = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    loss, acc = bradley_terry_loss(rc, rr)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(3)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected)
    assert acc.item() == pytest.approx(1 / 3)
    loss_m, _ = bradley_terry_loss(rc[:1, None], rr[:1, None], margin=torch.tensor([1.0], dtype=torch.float64))
    assert loss_m.item() == pytest.approx(math.log(2))


def test_bradley_terry_matches_trl_reward_trainer():
    g = torch.Generator().manual_seed(3)
    rc, rr = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    margin = torch.rand(6, generator=g)
    # TRL RewardTrainer.compute_loss (transcribed), with squeezed (B,) rewards
    ref = -F.logsigmoid(rc[:, 0] - rr[:, 0] - margin).mean() + 0.01 * torch.mean((rc[:, 0] + rr[:, 0]) ** 2)
    loss, acc = bradley_terry_loss(rc, rr, margin=margin, center_rewards_coef=0.01)
    torch.testing.assert_close(loss, ref)
    assert acc.item() == pytest.approx((rc > rr).float().mean().item())
    with pytest.raises(ValueError, match="r_chosen"):
        bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 2))
