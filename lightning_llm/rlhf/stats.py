"""Masked statistics: every RLHF average is taken over valid tokens only, never over padding.

Notation: B batch (rows), T token positions, ``mask`` True on valid (response) tokens.

Contract shared by every function here:

* ``mask`` has exactly the shape of ``x`` and is bool (or 0/1 integer/float, converted to bool).
* Padded entries are never read: they are replaced with 0 through :func:`torch.where` before any arithmetic, so any
  value there -- garbage, ``inf`` or ``NaN`` -- changes no output and sends no NaN gradient back.
* Reductions over an empty selection return ``NaN`` (visible in logs, never a silent 0); only
  :func:`masked_whiten`, whose output feeds training, raises instead.
* Half-precision inputs are accumulated in float32; the result comes back in the input dtype.

These match the definitions of TRL's former ``core.masked_mean / masked_var / masked_whiten`` (used by its PPOTrainer
and by "The N Implementation Details of RLHF with PPO"), with the padding made unreachable.
"""

from __future__ import annotations

import torch

from lightning_llm.rlhf._validation import check_float, check_mask, check_same_shape

Dim = int | tuple[int, ...] | None


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _prepare(fn: str, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, upcast half precision and zero the padding. Returns ``(x_zeroed_padding, bool_mask)``."""
    x = check_float(fn, "x", x)
    mask = check_mask(fn, mask, x.shape)
    x = x.to(_acc_dtype(x))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask


def _reduce_sum(x: torch.Tensor, dim: Dim, keepdim: bool) -> torch.Tensor:
    return x.sum() if dim is None else x.sum(dim=dim, keepdim=keepdim)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, keepdim: bool = False) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask`` is True.

    Args:
        x: float tensor, any shape.
        mask: same shape as ``x``; True on entries to include.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.
        keepdim: keep reduced dimensions as size 1.

    Returns:
        The sum (0 for an empty selection), in ``x.dtype``.
    """
    xz, _ = _prepare("masked_sum", x, mask)
    return _reduce_sum(xz, dim, keepdim).to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, keepdim: bool = False) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is True: ``sum(x * mask) / sum(mask)``.

    Args:
        x: float tensor, any shape.
        mask: same shape as ``x``.
        dim: dimension(s) to reduce; ``None`` averages over every valid entry of the whole tensor (the token-level
            mean used for PPO losses and statistics).
        keepdim: keep reduced dimensions as size 1.

    Returns:
        The mean, ``NaN`` where the selection is empty.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
        >>> m = torch.tensor([[True, True, False], [True, False, False]])
        >>> masked_mean(x, m)
        tensor(2.)
        >>> masked_mean(x, m, dim=1)
        tensor([1.5000, 3.0000])
    """
    xz, m = _prepare("masked_mean", x, mask)
    total = _reduce_sum(xz, dim, keepdim)
    count = _reduce_sum(m.to(xz.dtype), dim, keepdim)
    return (total / count).to(x.dtype)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim: Dim = None, keepdim: bool = False
) -> torch.Tensor:
    """Variance of ``x`` over entries where ``mask`` is True.

    ``var = masked_mean((x - masked_mean(x))^2) * n / (n - 1)`` with Bessel's correction when ``unbiased`` (TRL's
    convention, also ``torch.var``'s default), ``n`` the number of valid entries.

    Args:
        x: float tensor, any shape.
        mask: same shape as ``x``.
        unbiased: divide by ``n - 1`` instead of ``n``.
        dim: dimension(s) to reduce; ``None`` for all valid entries.
        keepdim: keep reduced dimensions as size 1.

    Returns:
        The variance; ``NaN`` where ``n == 0`` (or ``n == 1`` with ``unbiased``).
    """
    xz, m = _prepare("masked_var", x, mask)
    mf = m.to(xz.dtype)
    mean = _reduce_sum(xz, dim, True) / _reduce_sum(mf, dim, True)  # broadcastable against x
    centered = torch.where(m, xz - mean, torch.zeros((), dtype=xz.dtype, device=xz.device))
    sq = _reduce_sum(centered.square(), dim, keepdim)
    n = _reduce_sum(mf, dim, keepdim)
    denom = n - 1 if unbiased else n
    var = torch.where(denom > 0, sq / denom.clamp_min(1), torch.full_like(sq, float("nan")))
    return var.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its valid entries: ``(x - mean) / sqrt(var + eps)``.

    Used for PPO advantages ("advantages whitened over valid tokens", TRL / torchtune / N implementation details).
    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL does for rewards.

    Args:
        x: float tensor, any shape.
        mask: same shape as ``x``.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance inside the square root.

    Returns:
        Tensor of ``x``'s shape: whitened on valid entries, exactly 0 on padding.

    Raises:
        ValueError: fewer than 2 valid entries (the variance is undefined; whitening would spread NaN into training).
    """
    xz, m = _prepare("masked_whiten", x, mask)
    n = int(m.sum())
    if n < 2:
        raise ValueError(
            f"masked_whiten: needs at least 2 valid entries in `mask` to estimate a variance, got {n}. "
            "Use a larger batch or skip whitening for this batch."
        )
    mean = xz.sum() / n
    centered = torch.where(m, xz - mean, torch.zeros((), dtype=xz.dtype, device=xz.device))
    var = centered.square().sum() / (n - 1)
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device)).to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explained variance of the value predictions: ``1 - Var[returns - values] / Var[returns]`` over valid tokens.

    1 is a perfect value function, 0 no better than a constant, negative worse than a constant (the definition of
    OpenAI baselines' ``explained_variance`` and of scikit-learn's ``explained_variance_score``). Both variances
    use the same normalisation, so the choice of Bessel correction cancels.

    Args:
        values: ``(B, T)`` value predictions (any shape, matched by ``returns`` and ``mask``).
        returns: same shape, the regression targets.
        mask: same shape, True on valid tokens.

    Returns:
        Scalar, ``NaN`` when the returns are constant over the valid tokens (as baselines returns).
    """
    fn = "explained_variance"
    check_float(fn, "values", values)
    check_float(fn, "returns", returns)
    check_same_shape(fn, values=values, returns=returns)
    var_r = masked_var(returns, mask, unbiased=False)
    var_res = masked_var(returns.to(_acc_dtype(returns)) - values.to(_acc_dtype(values)), mask, unbiased=False)
    var_r32 = var_r.to(var_res.dtype)
    out = torch.where(var_r32 > 0, 1 - var_res / var_r32, torch.full_like(var_res, float("nan")))
    return out
