"""Reliability diagram (matplotlib) from a calibration metric's state or from raw confidences.

Uses ``matplotlib.figure.Figure`` directly (no pyplot, no GUI backend needed), so it works headless.

Notation:
    k: number of bins; conf: confidence in [0, 1]; correct: 0/1 per instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_llm.metrics.calibration_error import ExpectedCalibrationError
from lightning_llm.metrics.functional._checks import _check_confidence_correct, _check_positive_int
from lightning_llm.metrics.functional.calibration import _ece_update, equal_mass_bin_edges
from lightning_llm.metrics.helm_calibration import HELMCalibration

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _bin_stats(
    metric_or_confidence: Any, correct: Tensor | None, num_bins: int, binning: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(edges (k+1,), count (k,), confidence sum (k,), correct sum (k,))``."""
    if isinstance(metric_or_confidence, ExpectedCalibrationError):
        m = metric_or_confidence
        count, conf_sum, corr_sum = m.bin_count, m.bin_conf_sum, m.bin_correct_sum
        edges = torch.linspace(0, 1, m.num_bins + 1, dtype=torch.float64)
        return edges, count.cpu(), conf_sum.cpu(), corr_sum.cpu()
    if isinstance(metric_or_confidence, HELMCalibration):
        conf, corr = metric_or_confidence._gathered()
    else:
        if correct is None:
            raise ValueError(
                "`correct` is required when plotting raw confidences, received None. Fix: pass"
                " plot_reliability_diagram(confidence, correct) or a HELMCalibration / ExpectedCalibrationError."
            )
        conf, corr = _check_confidence_correct(metric_or_confidence, correct)
    conf, corr = conf.cpu(), corr.cpu()
    if conf.numel() == 0:
        raise ValueError("Nothing to plot: no instances. Fix: update the metric (or pass confidences) first.")
    if binning == "equal_mass":
        upper = equal_mass_bin_edges(conf, num_bins)
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), upper])
        idx = torch.searchsorted(upper, conf)
        nb = upper.numel()
        count = torch.bincount(idx, minlength=nb)
        conf_sum = torch.zeros(nb, dtype=torch.float64).index_add_(0, idx, conf)
        corr_sum = torch.zeros(nb, dtype=torch.float64).index_add_(0, idx, corr)
        return edges, count, conf_sum, corr_sum
    count, conf_sum, corr_sum = _ece_update(conf, corr, num_bins)
    return torch.linspace(0, 1, num_bins + 1, dtype=torch.float64), count, conf_sum, corr_sum


def plot_reliability_diagram(
    metric_or_confidence: ExpectedCalibrationError | HELMCalibration | Tensor,
    correct: Tensor | None = None,
    num_bins: int = 10,
    ax: Axes | None = None,
    binning: Literal["equal_width", "equal_mass"] = "equal_width",
) -> Figure:
    """Plot accuracy against confidence per bin, with the diagonal of perfect calibration.

    Args:
        metric_or_confidence: an :class:`ExpectedCalibrationError` (its own bins are used), a
            :class:`HELMCalibration` (its stored instances), or a tensor of confidences in [0, 1].
        correct: 0/1 per instance when ``metric_or_confidence`` is a tensor.
        num_bins: number of bins (ignored for ``ExpectedCalibrationError``, which has its own).
        ax: axes to draw into; a new ``Figure`` is made when ``None``.
        binning: ``"equal_width"`` or ``"equal_mass"`` (HELM's ``ece_10_bin`` bins).

    Returns:
        The ``matplotlib.figure.Figure`` holding the plot.

    Example:
        >>> import torch
        >>> fig = plot_reliability_diagram(torch.tensor([0.1, 0.7, 0.9]), torch.tensor([0, 1, 1]), num_bins=5)
        >>> type(fig).__name__
        'Figure'
    """
    from matplotlib.figure import Figure

    _check_positive_int("num_bins", num_bins)
    if binning not in ("equal_width", "equal_mass"):
        raise ValueError(f"`binning` must be 'equal_width' or 'equal_mass', received {binning!r}.")
    edges, count, conf_sum, corr_sum = _bin_stats(metric_or_confidence, correct, num_bins, binning)
    if ax is None:
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    cnt = count.to(torch.float64)
    nonempty = cnt > 0
    safe = cnt.clamp(min=1)
    acc = (corr_sum / safe)[nonempty].numpy()
    mean_conf = (conf_sum / safe)[nonempty].numpy()
    left = edges[:-1][nonempty].numpy()
    width = (edges[1:] - edges[:-1])[nonempty].numpy()
    ax.bar(left, acc, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(mean_conf, acc, "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram ({int(cnt.sum())} instances)")
    ax.legend(loc="upper left")
    return fig
