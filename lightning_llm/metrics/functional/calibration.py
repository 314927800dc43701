"""Calibration metrics: HELM's suite (equal-mass ECE, selective accuracy, Platt scaling), equal-width ECE, Brier.

HELM (``compute_calibration_metrics``) computes, from one confidence and one 0/1 correctness per instance, with
the ``uncertainty-calibration`` package (import name ``calibration``):

* ``ece_10_bin`` = ``calibration.get_ece_em(conf, correct, num_bins=10)``: equal-mass bins. Sort the
  confidences, split them into ``min(num_bins, N)`` parts with ``numpy.array_split`` semantics (the first
  ``N % k`` parts get one extra element), put a bin edge at the midpoint between neighbouring parts, append 1.0,
  merge duplicate edges; a confidence ``c`` falls in the first bin whose edge is ``>= c`` (``searchsorted``,
  left). ECE = ``sum_b (n_b / N) * |mean conf_b - mean correct_b|``.
* ``ece_1_bin`` = ``calibration.get_ece(conf, correct, num_bins=1)`` = ``|mean conf - accuracy|``.
* ``selective_cov_acc_area`` and ``selective_acc@10`` = ``calibration.get_selective_stats``: sort by confidence
  descending, running accuracy after each instance; the mean of those, and the one at index ``int(0.1 * N)``.
  Ties are ordered stably here (numpy's default quicksort leaves tied order unspecified).
* Platt scaling: logistic regression of ``correct`` on ``logit(clip(conf, 1e-12, 1 - 1e-12))``, as
  ``calibration.get_platt_scaler`` with scikit-learn ``LogisticRegression(C=1e10)``; here Newton's method in
  float64 on the same objective (log-loss + ``coef^2 / (2 C)``), no scikit-learn. ``platt_ece_10_bin`` and
  ``platt_ece_1_bin`` are the ECEs of the recalibrated confidences. If every instance is correct or every one
  wrong, the Platt ECEs are 0 and ``platt_coef`` / ``platt_intercept`` are absent, as in HELM.

When the data are separable (every correct instance more confident than every wrong one) the unregularised
maximum-likelihood coefficients are infinite; then the fit stops after ``max_iter`` Newton steps with large
coefficients, as any solver must, and the recalibrated confidences are (nearly) 0/1.

Notation:
    N: number of instances, k: number of bins, conf: confidence in [0, 1], correct: 0/1 per instance,
    x = logit(conf), p = sigmoid(coef * x + intercept): the Platt-recalibrated confidence.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_llm.metrics.functional._checks import _check_confidence_correct, _check_positive_int

PLATT_C = 1e10
PLATT_EPS = 1e-12
_NORMS = ("l1", "l2", "max")


def _require_nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(
            f"{what} of zero instances is undefined: received an empty `confidence`. Fix: call update() with at least"
            " one (confidence, correct) pair before compute()."
        )


# ----------------------------------------------------------------------------------------------------- equal mass
def equal_mass_bin_edges(confidence: Tensor, num_bins: int = 10) -> Tensor:
    """Upper bin edges of ``calibration.get_equal_bins`` (excluding 0, including 1.0), float64, sorted, unique.

    Example:
        >>> import torch
        >>> equal_mass_bin_edges(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), num_bins=2)  # parts [.1 .2 .3] [.4 .5]
        tensor([0.3500, 1.0000], dtype=torch.float64)
    """
    _check_positive_int("num_bins", num_bins)
    conf = confidence.detach().reshape(-1).to(torch.float64).sort().values  # (N,)
    n = conf.numel()
    _require_nonempty(n, "Equal-mass binning")
    k = min(num_bins, n)
    sizes = torch.full((k,), n // k, dtype=torch.int64)
    sizes[: n % k] += 1  # numpy.array_split: the first n % k parts get one extra element
    ends = torch.cumsum(sizes, 0)[:-1].to(conf.device)  # (k-1,) index of the first element of parts 1..k-1
    mids = (conf[ends - 1] + conf[ends]) / 2.0  # (k-1,)
    edges = torch.cat([mids, torch.ones(1, dtype=torch.float64, device=conf.device)])
    return torch.unique(edges)  # sorted, duplicates merged


def _binned_ece(conf: Tensor, corr: Tensor, edges: Tensor) -> float:
    """Plug-in l1 ECE of float64 ``conf``/``corr`` binned at sorted upper ``edges`` (searchsorted, left side)."""
    idx = torch.searchsorted(edges, conf)  # (N,) bin of each instance
    nb = edges.numel()
    count = torch.bincount(idx, minlength=nb).to(torch.float64)  # (k,)
    conf_sum = torch.zeros(nb, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)
    corr_sum = torch.zeros(nb, dtype=torch.float64, device=conf.device).index_add_(0, idx, corr)
    nonempty = count > 0
    gap = (conf_sum[nonempty] / count[nonempty] - corr_sum[nonempty] / count[nonempty]).abs()
    return float((count[nonempty] / conf.numel() * gap).sum())


def equal_mass_ece(confidence: Tensor, correct: Tensor, num_bins: int = 10) -> float:
    """l1 ECE with HELM's equal-mass bins (``calibration.get_ece_em``).

    Example:
        >>> import torch
        >>> # bins {0.2, 0.4} and {0.6, 0.8}: |0.3 - 0.5| / 2 + |0.7 - 1.0| / 2 = 0.25
        >>> round(equal_mass_ece(torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([0, 1, 1, 1]), num_bins=2), 6)
        0.25
    """
    conf, corr = _check_confidence_correct(confidence, correct)
    _require_nonempty(conf.numel(), "ECE")
    return _binned_ece(conf, corr, equal_mass_bin_edges(conf, num_bins))


def selective_stats(confidence: Tensor, correct: Tensor) -> tuple[float, float]:
    """``(selective_cov_acc_area, selective_acc@10)`` as ``calibration.get_selective_stats`` (stable on ties).

    Example:
        >>> import torch
        >>> # sorted: correct 1, 0, 1 -> running accuracies 1, 1/2, 2/3; area = 13/18; index int(0.3) = 0
        >>> area, acc10 = selective_stats(torch.tensor([0.9, 0.5, 0.7]), torch.tensor([1, 1, 0]))
        >>> round(area, 6), acc10
        (0.722222, 1.0)
    """
    conf, corr = _check_confidence_correct(confidence, correct)
    n = conf.numel()
    _require_nonempty(n, "Selective accuracy")
    order = torch.sort(conf, descending=True, stable=True).indices
    accs = torch.cumsum(corr[order], 0) / torch.arange(1, n + 1, dtype=torch.float64, device=conf.device)  # (N,)
    return float(accs.mean()), float(accs[int(0.1 * n)])


# ----------------------------------------------------------------------------------------------------------- Platt
def _platt_features(conf: Tensor) -> Tensor:
    p = conf.to(torch.float64).clamp(PLATT_EPS, 1 - PLATT_EPS)
    return torch.log(p / (1 - p))


def platt_scaling_fit(
    confidence: Tensor, correct: Tensor, c: float = PLATT_C, max_iter: int = 100, tol: float = 1e-10
) -> tuple[float, float]:
    """Fit Platt scaling ``p = sigmoid(coef * logit(conf) + intercept)`` by Newton's method in float64.

    Minimises ``sum_i logloss(correct_i, p_i) + coef^2 / (2 c)``, the objective of scikit-learn's
    ``LogisticRegression(C=c)`` (the intercept is not penalised), with a backtracking line search.

    Returns:
        ``(coef, intercept)`` as floats.

    Example:
        >>> import torch
        >>> conf = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.7, 0.3])
        >>> coef, intercept = platt_scaling_fit(conf, torch.tensor([0, 1, 0, 1, 1, 0]))
        >>> round(coef, 4), abs(round(intercept, 4))  # scikit-learn LogisticRegression(C=1e10): 1.7415, 0.0
        (1.7415, 0.0)
    """
    conf, corr = _check_confidence_correct(confidence, correct)
    _require_nonempty(conf.numel(), "Platt scaling")
    x = _platt_features(conf)
    X = torch.stack([x, torch.ones_like(x)], dim=1)  # (N, 2): feature and intercept column
    reg = torch.tensor([1.0 / c, 0.0], dtype=torch.float64, device=x.device)
    theta = torch.zeros(2, dtype=torch.float64, device=x.device)

    def objective(th: Tensor) -> Tensor:
        z = X @ th
        # log(1 + e^z) - y z, stable for large |z|
        return (torch.nn.functional.softplus(z) - corr * z).sum() + 0.5 * reg[0] * th[0] ** 2

    f = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(X @ theta)
        grad = X.T @ (p - corr) + reg * theta
        w = p * (1 - p)
        hess = X.T @ (X * w[:, None]) + torch.diag(reg)
        try:
            step = torch.linalg.solve(hess, grad)
        except RuntimeError:  # singular: fall back to the pseudo-inverse
            step = torch.linalg.pinv(hess) @ grad
        if not bool(torch.isfinite(step).all()):
            break
        t = 1.0
        while t > 1e-10:
            cand = theta - t * step
            f_cand = objective(cand)
            if bool(f_cand <= f + 1e-4 * t * (grad @ -step)) or bool(f_cand <= f):
                break
            t *= 0.5
        else:
            break
        converged = float((t * step).abs().max()) <= tol * (1.0 + float(theta.abs().max()))
        theta, f = cand, f_cand
        if converged:
            break
    return float(theta[0]), float(theta[1])


def platt_scale(confidence: Tensor, coef: float, intercept: float) -> Tensor:
    """Recalibrated confidences ``sigmoid(coef * logit(clip(conf, 1e-12, 1 - 1e-12)) + intercept)`` in float64."""
    x = _platt_features(confidence.detach().reshape(-1))
    return 1.0 / (1.0 + torch.exp(-(x * coef + intercept)))


# ------------------------------------------------------------------------------------------------------------ HELM
def helm_calibration(confidence: Tensor, correct: Tensor, num_bins: int = 10) -> dict[str, float]:
    """HELM's calibration metrics of one confidence and one 0/1 correctness per instance.

    Args:
        confidence: ``(N,)`` (any shape, flattened) probabilities in [0, 1], e.g. HELM's ``max_prob``.
        correct: same shape, 0/1 or bool (e.g. exact match).
        num_bins: equal-mass bins of ``ece_10_bin`` / ``platt_ece_10_bin`` (HELM uses 10; the key names keep "10").

    Returns:
        A dict of floats with keys ``ece_10_bin``, ``ece_1_bin``, ``selective_cov_acc_area``, ``selective_acc@10``,
        ``platt_ece_10_bin``, ``platt_ece_1_bin`` and, unless all instances are correct or all wrong,
        ``platt_coef`` and ``platt_intercept``.

    Example:
        >>> import torch
        >>> out = helm_calibration(torch.tensor([0.9, 0.8, 0.6, 0.3]), torch.tensor([1, 1, 1, 1]))
        >>> round(out["ece_1_bin"], 6), out["selective_acc@10"], out["platt_ece_10_bin"], "platt_coef" in out
        (0.35, 1.0, 0.0, False)
    """
    _check_positive_int("num_bins", num_bins)
    conf, corr = _check_confidence_correct(confidence, correct)
    n = conf.numel()
    _require_nonempty(n, "HELM calibration")
    area, acc10 = selective_stats(conf, corr)
    out: dict[str, float] = {
        "ece_10_bin": _binned_ece(conf, corr, equal_mass_bin_edges(conf, num_bins)),
        "ece_1_bin": abs(float(conf.mean()) - float(corr.mean())),
        "selective_cov_acc_area": area,
        "selective_acc@10": acc10,
    }
    n_correct = float(corr.sum())
    if n_correct == 0 or n_correct == n:  # HELM: Platt scaling is undefined, report 0 and no coefficients
        out["platt_ece_10_bin"] = 0.0
        out["platt_ece_1_bin"] = 0.0
        return out
    coef, intercept = platt_scaling_fit(conf, corr)
    cal = platt_scale(conf, coef, intercept)
    out["platt_coef"] = coef
    out["platt_intercept"] = intercept
    out["platt_ece_10_bin"] = _binned_ece(cal, corr, equal_mass_bin_edges(cal, num_bins))
    out["platt_ece_1_bin"] = abs(float(cal.mean()) - float(corr.mean()))
    return out


# ----------------------------------------------------------------------------------------------- equal-width ECE
def _check_norm(norm: object) -> None:
    if norm not in _NORMS:
        raise ValueError(f"`norm` must be one of {_NORMS}, received {norm!r}. Fix: use norm='l1' for the usual ECE.")


def _ece_update(confidence: Tensor, correct: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin ``(count int64, confidence sum float64, correct sum float64)``, each ``(num_bins,)``.

    Equal-width bins ``[i/k, (i+1)/k)`` with the last one closed, ``[(k-1)/k, 1]``; bin indices come from
    ``torch.bucketize`` against ``linspace(0, 1, k + 1)`` in the confidence's dtype, as torchmetrics does, so every
    confidence below 1.0 lands in the same bin as in torchmetrics' ``BinaryCalibrationError``.
    """
    conf64, corr64 = _check_confidence_correct(confidence, correct)
    conf = confidence.detach().reshape(-1)
    if conf.dtype not in (torch.float32, torch.float64):
        conf = conf.float()
    boundaries = torch.linspace(0, 1, num_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = (torch.bucketize(conf, boundaries, right=True) - 1).clamp_(0, num_bins - 1)  # (N,)
    count = torch.bincount(idx, minlength=num_bins).to(torch.int64)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf64)
    corr_sum = torch.zeros(num_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, corr64)
    return count, conf_sum, corr_sum


def _ece_compute(count: Tensor, conf_sum: Tensor, corr_sum: Tensor, norm: str = "l1") -> Tensor:
    total = int(count.sum())
    _require_nonempty(total, "ECE")
    cnt = count.to(torch.float64)
    safe = cnt.clamp(min=1)
    gap = (conf_sum / safe - corr_sum / safe).abs()  # (k,), 0 for empty bins
    prop = cnt / total
    if norm == "l1":
        return (prop * gap).sum()
    if norm == "l2":
        return (prop * gap**2).sum().sqrt()
    return gap.max()


def expected_calibration_error(
    confidence: Tensor, correct: Tensor, num_bins: int = 15, norm: Literal["l1", "l2", "max"] = "l1"
) -> Tensor:
    """Equal-width calibration error (``l1`` = ECE, ``l2`` = RMS CE, ``max`` = MCE), float64.

    Matches ``torchmetrics.functional.classification.binary_calibration_error(confidence, correct)`` except for
    confidences of exactly 1.0, which torchmetrics puts in an extra (k+1)-th bin and this function in the last bin.

    Example:
        >>> import torch
        >>> # bins [0, .5) and [.5, 1]: |0.2 - 0| / 2 + |0.8 - 1| / 2 = 0.2
        >>> expected_calibration_error(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]), num_bins=2)
        tensor(0.2000, dtype=torch.float64)
    """
    _check_positive_int("num_bins", num_bins)
    _check_norm(norm)
    return _ece_compute(*_ece_update(confidence, correct, num_bins), norm=norm)


def brier_score(confidence: Tensor, correct: Tensor) -> Tensor:
    """Mean squared error ``mean((confidence - correct)^2)`` in float64.

    Example:
        >>> import torch
        >>> brier_score(torch.tensor([0.9, 0.4]), torch.tensor([1, 0]))  # (0.01 + 0.16) / 2
        tensor(0.0850, dtype=torch.float64)
    """
    conf, corr = _check_confidence_correct(confidence, correct)
    _require_nonempty(conf.numel(), "Brier score")
    return ((conf - corr) ** 2).mean()
