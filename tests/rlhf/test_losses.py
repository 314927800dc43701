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


def test_dpo_hand_values():
    # h = (logp_c - ref_c) - (logp_r - ref_r) = (-5 - -6) - (-7 - -6) = 2; beta 0.1
    # sigmoid: -logsigmoid(0.2) = log(1 + e^-0.2); IPO: (2 - 1/0.2)^2 = 9
    args = [torch.tensor([x], dtype=torch.float64) for x in (-5.0, -7.0, -6.0, -6.0)]
    loss, cr, rr = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    loss_ipo, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert loss_ipo.item() == pytest.approx(9.0)
    # hinge: relu(1 - 0.1 * 2) = 0.8; sppo_hard: (lc - 5)^2 + (lr + 5)^2 = (1 - 5)^2 + (-1 + 5)^2 = 32
    assert dpo_loss(*args, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)
    assert dpo_loss(*args, beta=0.1, loss_type="sppo_hard")[0].item() == pytest.approx(32.0)
    # bco_pair: -logsigmoid(0.1) - logsigmoid(0.1) (lc = 1, lr = -1); apo_zero: 1 - sigmoid(0.1) + sigmoid(-0.1)
    sig = 1 / (1 + math.exp(-0.1))
    assert dpo_loss(*args, beta=0.1, loss_type="bco_pair")[0].item() == pytest.approx(-2 * math.log(sig))
    assert dpo_loss(*args, beta=0.1, loss_type="apo_zero")[0].item() == pytest.approx(2 - 2 * sig)
    # ipo with lengths (2, 4): (1/2 - -1/4 - 5)^2 = 4.25^2; sft: -(-5) / 2 = 2.5
    lengths = {"chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([4])}
    assert dpo_loss(*args, beta=0.1, loss_type="ipo", **lengths)[0].item() == pytest.approx(4.25**2)
    assert dpo_loss(*args, loss_type="sft", **lengths)[0].item() == pytest.approx(2.5)
    # MPO-style weighted sum: 0.5 * hinge + 2 * sft = 0.4 + 5
    mixed = dpo_loss(*args, beta=0.1, loss_type=["hinge", "sft"], loss_weights=[0.5, 2.0], **lengths)[0]
    assert mixed.item() == pytest.approx(5.4)
    # forward KL scores 1 - e^-lc = 1 - e^-1, 1 - e^1: sigmoid of beta * (e - e^-1)
    fkl = dpo_loss(*args, beta=0.1, f_divergence_type="forward_kl")[0]
    assert fkl.item() == pytest.approx(math.log1p(math.exp(-0.1 * (math.e - 1 / math.e))))


def test_dpo_reductions_and_gradient_direction():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(8, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    pc.requires_grad_()
    per_pair, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, reduction="none")
    assert per_pair.shape == (8,)
    total, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, reduction="sum")
    torch.testing.assert_close(total, per_pair.sum())
    mean, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    mean.backward()
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the DPO loss


def test_dpo_errors():
    x = torch.zeros(3)
    lengths = {"chosen_lengths": torch.ones(3), "rejected_lengths": torch.ones(3)}
    with pytest.raises(ValueError, match="unknown `loss_type` 'kto'"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="`loss_weights` must have one weight per loss type: 2"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="f_divergence_type"):
        dpo_loss(x, x, x, x, loss_type="apo_zero", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="f_divergence_type"):
        dpo_loss(x, x, x, x, f_divergence_type="chi2")
    with pytest.raises(ValueError, match="needs `chosen_lengths`"):
        dpo_loss(x, x, x, x, loss_type="sft")
    with pytest.raises(ValueError, match="both"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="`rejected_lengths` must be a \\(3,\\) tensor"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(4))
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(x, x, x, x, loss_type="discopop", discopop_tau=0.0, **lengths)
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


def test_bradley_terry_formula_with_margin_and_centering():
    """The REFERENCES.md formula plus the centring term (TRL's own RewardTrainer is compared end to end in
    tests/modules/test_trl_parity.py)."""
    g = torch.Generator().manual_seed(3)
    rc, rr = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    margin = torch.rand(6, generator=g)
    ref = -F.logsigmoid(rc[:, 0] - rr[:, 0] - margin).mean() + 0.01 * torch.mean((rc[:, 0] + rr[:, 0]) ** 2)
    loss, acc = bradley_terry_loss(rc, rr, margin=margin, center_rewards_coef=0.01)
    torch.testing.assert_close(loss, ref)
    assert acc.item() == pytest.approx((rc > rr).float().mean().item())
    with pytest.raises(ValueError, match="r_chosen"):
        bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 2))


# ---------------------------------------------------------------- GRPO / RLOO: parity with TRL's own loss code


def _grpo_inputs(seed=0, b=6, t=5, truncate_row=None):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well outside the clip
    ref = logp.detach() + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]  # right padding, ragged lengths
    if truncate_row is not None:
        mask[truncate_row] = False  # a masked truncated completion
    return logp, old, ref, adv, mask


def _trl_minimal(cls, logp, **attrs):
    """A TRL trainer object with only what its ``_compute_loss`` reads; the model forward returns ``logp``."""
    from collections import defaultdict
    from types import SimpleNamespace

    trainer = cls.__new__(cls)
    defaults = {
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "importance_sampling_level": "token",
        "use_vllm": False,
        "vllm_importance_sampling_correction": False,
        "model": torch.nn.Linear(1, 1).train(),
        "current_gradient_accumulation_steps": 1,
        "accelerator": SimpleNamespace(
            num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x
        ),
        "_entropy_bonus_enabled": False,
        "aux_loss_enabled": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "args": SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    }
    for k, v in {**defaults, **attrs}.items():
        setattr(trainer, k, v)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    return trainer


def _trl_inputs(logp, mask, adv, **extra):
    b, t = logp.shape
    return {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        **extra,
    }


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl_compute_loss(loss_type, beta):
    from trl import GRPOTrainer

    from lightning_llm.rlhf import grpo_loss

    logp, old, ref, adv, mask = _grpo_inputs(truncate_row=2)
    num_items = mask.sum()
    trainer = _trl_minimal(
        GRPOTrainer, logp, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=7
    )
    inputs = _trl_inputs(
        logp, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=num_items
    )
    expected = trainer._compute_loss(None, inputs)
    (g_expected,) = torch.autograd.grad(expected, logp)
    ours, stats = grpo_loss(
        logp,
        old,
        adv,
        mask,
        ref_logp=ref,
        beta=beta,
        clip_eps=0.2,
        clip_eps_high=0.28,
        loss_type=loss_type,
        max_completion_length=7,
        num_items=num_items,
    )
    (g_ours,) = torch.autograd.grad(ours, logp)
    assert abs(float(ours.detach()) - float(expected.detach())) < 1e-6
    torch.testing.assert_close(g_ours, g_expected, rtol=1e-6, atol=1e-9)
    metrics = trainer._metrics["train"]
    assert float(stats["clip_ratio_region"]) == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    assert float(stats["clip_ratio_low"]) == pytest.approx(metrics["clip_ratio/low_mean"][-1], abs=1e-6)
    if beta:
        assert float(stats["kl"]) == pytest.approx(metrics["kl"][-1], abs=1e-6)
    assert 0 < float(stats["clip_ratio_region"]) < 1  # the case exercises both branches of the min


def test_grpo_loss_one_update_per_generation_has_ratio_one_and_policy_gradient():
    from lightning_llm.rlhf import grpo_loss

    logp, _, _, adv, mask = _grpo_inputs(seed=3)
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, loss_type="bnpo")
    # ratio 1: loss = -sum(A_i * n_i) / sum(n_i); gradient d/dlogp_it = -A_i / sum(n)
    n = mask.sum(1).double()
    assert float(loss.detach()) == pytest.approx(float(-(adv * n).sum() / n.sum()), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.where(mask, -adv[:, None] / n.sum(), 0.0))
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_ratio_region"]) == 0.0


def test_grpo_loss_errors():
    from lightning_llm.rlhf import grpo_loss

    logp, old, _, adv, mask = _grpo_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="one entry per row"):
        grpo_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="non-finite"):
        grpo_loss(logp, old, adv * float("nan"), mask)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_sequence_level_policy_loss_equals_trl_rloo_compute_loss(eps_high):
    from trl import RLOOTrainer

    from lightning_llm.rlhf import policy_loss

    logp, old, _, adv, mask = _grpo_inputs(seed=1, truncate_row=0)
    old = logp.detach() + 0.5 * (old - logp.detach())  # sequence ratios inside and outside the clip range
    old_seq = torch.where(mask, old, 0.0).sum(1)  # TRL stores old_logps = (old_per_token_logps * mask).sum(1)
    trainer = _trl_minimal(RLOOTrainer, logp, epsilon_low=0.2, epsilon_high=0.2 if eps_high is None else eps_high)
    expected = trainer._compute_loss(None, _trl_inputs(logp, mask, adv, old_logps=old_seq))
    (g_expected,) = torch.autograd.grad(expected, logp)
    ours, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high, level="sequence")
    (g_ours,) = torch.autograd.grad(ours, logp)
    assert abs(float(ours.detach()) - float(expected.detach())) < 1e-6
    torch.testing.assert_close(g_ours, g_expected, rtol=1e-6, atol=1e-9)
    ours_seq, _ = policy_loss(
        logp, old_seq, adv, mask, clip_eps=0.2, clip_eps_high=eps_high, level="sequence"
    )  # (B,) old sums
    assert abs(float(ours_seq.detach()) - float(expected.detach())) < 1e-6
    metrics = trainer._metrics["train"]
    assert float(stats["clip_ratio_region"]) == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    assert 0 < float(stats["clip_ratio_region"]) < 1
    with pytest.raises(ValueError, match=r"policy_loss: `level` must be one of \['token', 'sequence'\], got 'seq'"):
        policy_loss(logp, old, adv, mask, level="seq")
