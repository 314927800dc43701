"""HELM calibration vs the `uncertainty-calibration` package (HELM's dependency) and scikit-learn; equal-width ECE
and Brier vs torchmetrics and numpy; confidence helpers and the reliability diagram."""

import math

import calibration as cal
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss
from torchmetrics.functional.classification import binary_calibration_error

from lightning_llm.metrics import BrierScore, ExpectedCalibrationError, HELMCalibration, plot_reliability_diagram
from lightning_llm.metrics.functional import (
    brier_score,
    equal_mass_bin_edges,
    equal_mass_ece,
    expected_calibration_error,
    generation_confidence,
    helm_calibration,
    multiple_choice_confidence,
    platt_scaling_fit,
    selective_stats,
)


def helm_compute_calibration_metrics(max_probs, correct):
    """Transcription of HELM's `compute_calibration_metrics` (uses the `calibration` package like HELM)."""
    max_probs = list(map(float, max_probs))
    correct = [int(c) for c in correct]
    stats = {
        "ece_10_bin": cal.get_ece_em(max_probs, correct, num_bins=10),
        "ece_1_bin": cal.get_ece(max_probs, correct, num_bins=1),
    }
    stats["selective_cov_acc_area"], stats["selective_acc@10"] = cal.get_selective_stats(max_probs, correct)
    if np.sum(correct) == 0 or np.sum(correct) == len(correct):
        stats["platt_ece_10_bin"] = 0.0
        stats["platt_ece_1_bin"] = 0.0
    else:
        platt_scaler, clf = cal.get_platt_scaler(np.array(max_probs), np.array(correct), get_clf=True)
        stats["platt_coef"] = clf.coef_[0][0]
        stats["platt_intercept"] = clf.intercept_[0]
        cal_max_probs = platt_scaler(np.array(max_probs))
        stats["platt_ece_10_bin"] = cal.get_ece_em(cal_max_probs, correct, num_bins=10)
        stats["platt_ece_1_bin"] = cal.get_ece(cal_max_probs, correct, num_bins=1)
    return stats


def _data(seed, n, ties=False):
    rng = np.random.default_rng(seed)
    conf = rng.choice([0.25, 0.5, 0.75, 0.9, 1.0], size=n) if ties else rng.uniform(0.05, 0.999, size=n)
    correct = (rng.uniform(size=n) < conf**1.5).astype(np.int64)  # mis-calibrated on purpose
    return conf, correct


def _sklearn_tight(conf, correct):
    p = np.clip(conf.astype(np.float64), 1e-12, 1 - 1e-12)
    x = np.log(p / (1 - p))[:, None]
    clf = LogisticRegression(C=1e10, solver="lbfgs", tol=1e-12, max_iter=10_000).fit(x, correct)
    return clf.coef_[0][0], clf.intercept_[0]


@pytest.mark.parametrize(("seed", "n"), [(0, 200), (1, 37), (2, 7), (3, 1000)])
def test_helm_calibration_matches_helm_transcription(seed, n):
    conf, correct = _data(seed, n)
    ref = helm_compute_calibration_metrics(conf, correct)
    ours = helm_calibration(torch.tensor(conf), torch.tensor(correct))
    assert set(ours) == set(ref)
    for key in ("ece_10_bin", "ece_1_bin", "selective_cov_acc_area", "selective_acc@10"):
        assert math.isclose(ours[key], ref[key], rel_tol=1e-9, abs_tol=1e-12), key
    # Platt: HELM's scikit-learn call stops at lbfgs' default tol=1e-4 (gradient), i.e. up to ~1e-3 away from the
    # optimum (seen: 3.6770 vs 3.6792 at n=7); the converged fit below is matched to 1e-6.
    for key in ("platt_coef", "platt_intercept", "platt_ece_10_bin", "platt_ece_1_bin"):
        assert math.isclose(ours[key], ref[key], rel_tol=2e-3, abs_tol=1e-3), key
    coef, intercept = _sklearn_tight(conf, correct)  # the converged optimum
    assert math.isclose(ours["platt_coef"], coef, rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(ours["platt_intercept"], intercept, rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 10, 11, 25])
def test_equal_mass_ece_with_ties_matches_calibration_package(n):
    conf, correct = _data(n, n, ties=True)
    assert math.isclose(
        equal_mass_ece(torch.tensor(conf), torch.tensor(correct), num_bins=10),
        cal.get_ece_em(list(conf), list(correct), num_bins=10),
        rel_tol=1e-12,
        abs_tol=1e-15,
    )
    ref_edges = cal.get_equal_bins(list(conf), num_bins=10)
    torch.testing.assert_close(
        equal_mass_bin_edges(torch.tensor(conf), 10), torch.tensor(ref_edges, dtype=torch.float64)
    )


def test_selective_stats_with_ties_is_stable_sort():
    conf, correct = _data(5, 40, ties=True)
    order = np.argsort(-conf, kind="stable")
    accs = np.cumsum(correct[order]) / np.arange(1, 41)
    area, acc10 = selective_stats(torch.tensor(conf), torch.tensor(correct))
    assert math.isclose(area, accs.mean(), rel_tol=1e-12) and acc10 == accs[int(0.1 * 40)]


@pytest.mark.parametrize("value", [0, 1])
def test_all_correct_or_all_wrong_edge_case(value):
    conf = np.array([0.2, 0.9, 0.5, 0.7])
    correct = np.full(4, value)
    ref = helm_compute_calibration_metrics(conf, correct)
    ours = helm_calibration(torch.tensor(conf), torch.tensor(correct))
    assert set(ours) == set(ref) and "platt_coef" not in ours
    assert ours["platt_ece_10_bin"] == 0.0 and ours["platt_ece_1_bin"] == 0.0
    for key in ref:
        assert math.isclose(ours[key], ref[key], rel_tol=1e-12, abs_tol=1e-15)


def test_platt_matches_calibration_get_platt_scaler():
    conf, correct = _data(11, 300)
    _, clf = cal.get_platt_scaler(conf, correct, get_clf=True)  # HELM's call: sklearn defaults (tol=1e-4)
    coef, intercept = platt_scaling_fit(torch.tensor(conf), torch.tensor(correct))
    assert math.isclose(coef, clf.coef_[0][0], rel_tol=1e-4, abs_tol=1e-4)
    assert math.isclose(intercept, clf.intercept_[0], rel_tol=1e-4, abs_tol=1e-4)
    ref_coef, ref_intercept = _sklearn_tight(conf, correct)
    assert math.isclose(coef, ref_coef, rel_tol=1e-7) and math.isclose(intercept, ref_intercept, rel_tol=1e-7)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_helm_metric_class_and_forward():
    conf, correct = _data(4, 120)
    ref = helm_calibration(torch.tensor(conf), torch.tensor(correct))
    metric = HELMCalibration()
    for i in range(0, 120, 50):
        batch = metric(torch.tensor(conf[i : i + 50]).float(), torch.tensor(correct[i : i + 50]).bool())
        assert "ece_10_bin" in batch
    out = metric.compute()
    for key, value in ref.items():
        # float32 confidences in the class vs float64 in the reference
        assert math.isclose(out[key].item(), value, rel_tol=1e-5, abs_tol=1e-6), key
    metric.reset()
    with pytest.raises(ValueError, match="empty"):
        metric.compute()


# ---------------------------------------------------------------------------------------- equal-width ECE, Brier
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_torchmetrics(norm, num_bins):
    g = torch.Generator().manual_seed(num_bins)
    conf = torch.rand(500, generator=g) * 0.999
    correct = (torch.rand(500, generator=g) < conf**2).long()
    ref = binary_calibration_error(conf, correct, n_bins=num_bins, norm=norm)
    metric = ExpectedCalibrationError(num_bins=num_bins, norm=norm)
    metric.update(conf[:200], correct[:200])
    metric.update(conf[200:], correct[200:])
    torch.testing.assert_close(metric.compute().float(), ref.float(), rtol=1e-5, atol=1e-7)
    ours = expected_calibration_error(conf, correct, num_bins, norm)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-5, atol=1e-7)


def _numpy_ece(conf, correct, k, norm):
    """Equal-width bins [i/k, (i+1)/k), last one closed at 1.0 (Guo et al. / Naeini et al.)."""
    idx = np.minimum((conf * k).astype(int), k - 1)
    gaps, props = [], []
    for b in range(k):
        sel = idx == b
        if sel.any():
            gaps.append(abs(conf[sel].mean() - correct[sel].mean()))
            props.append(sel.mean())
    gaps, props = np.array(gaps), np.array(props)
    return {"l1": (gaps * props).sum(), "l2": math.sqrt((gaps**2 * props).sum()), "max": gaps.max()}[norm]


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_ece_with_confidence_one_matches_numpy_formula(norm):
    conf = np.array([0.05, 0.33, 0.61, 1.0, 1.0, 0.97, 0.5])  # no value on an inner bin edge (k = 10)
    correct = np.array([0, 1, 1, 1, 0, 1, 0])
    ours = expected_calibration_error(torch.tensor(conf), torch.tensor(correct), 10, norm).item()
    assert math.isclose(ours, _numpy_ece(conf, correct, 10, norm), rel_tol=1e-12)


def test_brier_score():
    conf, correct = _data(7, 50)
    ref = brier_score_loss(correct, conf)
    assert math.isclose(brier_score(torch.tensor(conf), torch.tensor(correct)).item(), ref, rel_tol=1e-12)
    metric = BrierScore()
    metric.update(torch.tensor(conf[:20]), torch.tensor(correct[:20]))
    metric.update(torch.tensor(conf[20:]), torch.tensor(correct[20:]))
    assert math.isclose(metric.compute().item(), float(np.mean((conf - correct) ** 2)), rel_tol=1e-12)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("conf", "correct", "exc", "match"),
    [
        (torch.tensor([0.5, 1.5]), torch.tensor([1, 0]), ValueError, r"must lie in \[0, 1\]"),
        (torch.tensor([-0.1, 0.5]), torch.tensor([1, 0]), ValueError, r"must lie in \[0, 1\]"),
        (torch.tensor([float("nan"), 0.5]), torch.tensor([1, 0]), ValueError, "NaN or inf"),
        (torch.tensor([float("inf"), 0.5]), torch.tensor([1, 0]), ValueError, "NaN or inf"),
        (torch.tensor([0.5, 0.2]), torch.tensor([1, 0, 1]), ValueError, "same shape"),
        (torch.tensor([1, 0]), torch.tensor([1, 0]), TypeError, "floating-point"),
        (torch.tensor([0.5, 0.2]), torch.tensor([2, 0]), ValueError, "only 0/1"),
        (torch.zeros(0), torch.zeros(0), ValueError, "empty|zero instances"),
    ],
)
@pytest.mark.parametrize("fn", [helm_calibration, expected_calibration_error, brier_score])
def test_bad_input_errors(conf, correct, exc, match, fn):
    with pytest.raises(exc, match=match):
        fn(conf, correct)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_argument_errors_and_empty_metrics():
    with pytest.raises(ValueError, match="norm"):
        ExpectedCalibrationError(norm="l3")
    with pytest.raises(ValueError, match="num_bins"):
        ExpectedCalibrationError(num_bins=0)
    for metric in (ExpectedCalibrationError(), BrierScore(), HELMCalibration()):
        with pytest.raises(ValueError, match="zero instances|empty"):
            metric.compute()


# ------------------------------------------------------------------------------------------------ helpers, plot
def test_multiple_choice_confidence():
    lp = torch.tensor([[math.log(0.1), math.log(0.3), math.log(0.2)], [-1.0, -4.0, float("-inf")]], dtype=torch.float64)
    conf, pred = multiple_choice_confidence(lp)
    # softmax renormalises: 0.3 / 0.6 = 0.5; row 2: e^-1 / (e^-1 + e^-4)
    torch.testing.assert_close(conf, torch.tensor([0.5, 1 / (1 + math.exp(-3))], dtype=torch.float64))
    assert pred.tolist() == [1, 0]
    lengths = torch.tensor([[1, 3, 1], [1, 8, 1]])
    conf_n, pred_n = multiple_choice_confidence(lp, lengths, length_normalize=True)
    # row 1 normalised: [ln .1, ln(.3)/3, ln .2] -> argmax is ln(.3)/3 = -0.401; row 2: [-1, -0.5, -inf] -> 1
    assert pred_n.tolist() == [1, 1]
    z = torch.tensor([math.log(0.1), math.log(0.3) / 3, math.log(0.2)], dtype=torch.float64)
    assert math.isclose(conf_n[0].item(), (z.exp().max() / z.exp().sum()).item(), rel_tol=1e-12)
    with pytest.raises(ValueError, match="choice_lengths"):
        multiple_choice_confidence(lp, length_normalize=True)
    with pytest.raises(ValueError, match="NaN"):
        multiple_choice_confidence(torch.tensor([[float("nan"), 0.0]]))


def test_generation_confidence():
    lp = torch.tensor([[math.log(0.5), math.log(0.4), -3.0], [math.log(0.9), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(generation_confidence(lp, mask), torch.tensor([0.2, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match="log-probabilities"):
        generation_confidence(torch.tensor([[0.7]]))


def test_reliability_diagram():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    conf, correct = _data(9, 60)
    metric = ExpectedCalibrationError(num_bins=5)
    metric.update(torch.tensor(conf), torch.tensor(correct))
    fig = plot_reliability_diagram(metric)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) <= 5
    helm = HELMCalibration()
    helm.update(torch.tensor(conf), torch.tensor(correct))
    assert isinstance(plot_reliability_diagram(helm, binning="equal_mass"), Figure)
    fig2 = Figure()
    ax = fig2.add_subplot(1, 1, 1)
    assert plot_reliability_diagram(torch.tensor(conf), torch.tensor(correct), ax=ax) is fig2
    with pytest.raises(ValueError, match="correct"):
        plot_reliability_diagram(torch.tensor(conf))


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=30, deadline=None)
@given(
    conf=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.5, 0.7, 0.99, 1.0]) | st.floats(0.0, 1.0), min_size=1, max_size=40),
    seed=st.integers(0, 1000),
    num_bins=st.integers(1, 12),
)
def test_property_equal_mass_ece_matches_package(conf, seed, num_bins):
    conf = np.array(conf, dtype=np.float64)
    correct = np.random.default_rng(seed).integers(0, 2, size=conf.size)
    ours = equal_mass_ece(torch.tensor(conf), torch.tensor(correct), num_bins)
    ref = cal.get_ece_em(list(conf), list(correct), num_bins=num_bins)
    assert math.isclose(ours, ref, rel_tol=1e-9, abs_tol=1e-12)
    assert 0.0 <= ours <= 1.0
    out = helm_calibration(torch.tensor(conf), torch.tensor(correct))
    assert all(math.isfinite(v) for v in out.values())
    for key in ("ece_10_bin", "ece_1_bin", "platt_ece_10_bin", "platt_ece_1_bin", "selective_acc@10"):
        assert -1e-12 <= out[key] <= 1.0 + 1e-12


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), cut=st.integers(0, 60), seed=st.integers(0, 1000), num_bins=st.integers(1, 20))
def test_property_fixed_state_metrics_are_split_invariant(n, cut, seed, num_bins):
    conf, correct = _data(seed, n)
    conf_t, correct_t = torch.tensor(conf), torch.tensor(correct)
    cut = min(cut, n)
    for norm in ("l1", "l2", "max"):
        metric = ExpectedCalibrationError(num_bins=num_bins, norm=norm)
        if cut:
            metric(conf_t[:cut], correct_t[:cut])  # forward: batch value + accumulation
        if cut < n:
            metric(conf_t[cut:], correct_t[cut:])
        full = expected_calibration_error(conf_t, correct_t, num_bins, norm)
        torch.testing.assert_close(metric.compute(), full, rtol=1e-12, atol=1e-12)
        assert math.isclose(full.item(), _numpy_ece(conf, correct, num_bins, norm), rel_tol=1e-9, abs_tol=1e-12)
    brier = BrierScore()
    brier.update(conf_t[:cut], correct_t[:cut])
    brier.update(conf_t[cut:], correct_t[cut:])
    assert math.isclose(brier.compute().item(), float(np.mean((conf - correct) ** 2)), rel_tol=1e-9, abs_tol=1e-15)
