"""Input checks shared by the RLHF functions.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value) with a message that
names the function and the argument, says what was expected and what was received, and how to fix it.

Checks that need the values (non-finite entries, masks that are not 0/1, token ids out of range) read one boolean
back from the device, i.e. they synchronise once; the RLHF math runs once per rollout or minibatch, where that is
negligible next to the model's forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(fn: str, name: str, x: object, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Raise ``TypeError`` unless ``x`` is a tensor (optionally with ``ndim`` dimensions, or one of several)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}. Wrap it with torch.as_tensor.")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(
                f"{fn}: `{name}` must have {want} dimension(s), got shape {tuple(x.shape)} ({x.dim()} dims)."
            )
    return x


def check_float(fn: str, name: str, x: object, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Raise unless ``x`` is a floating-point tensor."""
    x = check_tensor(fn, name, x, ndim)
    if not x.is_floating_point():
        raise TypeError(f"{fn}: `{name}` must be a floating-point tensor, got dtype {x.dtype}. Cast it with .float().")
    return x


def check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless all tensors share one shape (names in the message, in the order given)."""
    items = list(tensors.items())
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.shape != ref.shape:
            shapes = ", ".join(f"{n}={tuple(v.shape)}" for n, v in items)
            raise ValueError(
                f"{fn}: `{name}` must have the same shape as `{ref_name}` {tuple(ref.shape)}, got {tuple(t.shape)} "
                f"(all shapes: {shapes}). Pass tensors aligned token-for-token."
            )


def check_rows(fn: str, name: str, x: torch.Tensor, logp: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` has one entry per row of ``logp`` (a per-sequence value)."""
    if x.shape[0] != logp.shape[0]:
        raise ValueError(
            f"{fn}: `{name}` must have one entry per row of `logp` ({logp.shape[0]}), got shape {tuple(x.shape)}."
        )


def check_mask(fn: str, mask: object, shape: torch.Size | tuple[int, ...], name: str = "mask") -> torch.Tensor:
    """Validate a 0/1 mask of the given shape and return it as ``torch.bool``.

    Accepted dtypes: bool (preferred, no value check), integer or floating with every entry 0 or 1 (e.g. an
    ``attention_mask``). Anything else is rejected: a float "mask" holding weights is almost always a bug here.
    """
    mask = check_tensor(fn, name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{fn}: `{name}` must have shape {tuple(shape)} (the shape of the tensor it masks), "
            f"got {tuple(mask.shape)}."
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(
            f"{fn}: `{name}` must be a bool tensor (or 0/1 integer/float), got dtype {mask.dtype}. Use `mask.bool()`."
        )
    if bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:5].tolist()
        raise ValueError(
            f"{fn}: `{name}` must contain only 0 and 1 (True/False), got values such as {bad} (dtype {mask.dtype}). "
            "Pass a boolean mask of the valid (response) tokens, e.g. `mask.bool()` after thresholding."
        )
    return mask != 0


def check_finite(fn: str, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or +-inf (only where ``mask`` is True, when given)."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        n_nan = int(torch.isnan(x[bad]).sum())
        raise ValueError(
            f"{fn}: `{name}` contains non-finite values ({int(bad.sum())} entries, {n_nan} NaN; first at index "
            f"{idx}). Check the reward function / model that produced `{name}`; NaN would silently poison training."
        )


def check_choice(fn: str, name: str, value: object, choices: Sequence[str]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {list(choices)}, got {value!r}.")
    return value  # type: ignore[return-value]


def check_range(
    fn: str,
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Raise ``ValueError`` unless a python number lies in the given interval; ``TypeError`` if not a number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: `{name}` must be a scalar, got a tensor of shape {tuple(value.shape)}.")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}.")
    value = float(value)
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok or value != value:  # NaN fails every comparison
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise ValueError(f"{fn}: `{name}` must lie in {interval}, got {value}.")
    return value


def check_scored_logps(
    fn: str, scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: object
) -> torch.Tensor:
    """Check ``(B,)`` sequence ``scores`` and the ``(B, T)`` policy and reference log-probabilities of their tokens,
    all finite where they count; return ``mask`` as ``torch.bool``."""
    check_float(fn, "scores", scores, ndim=1)
    check_float(fn, "logp", logp, ndim=2)
    check_float(fn, "ref_logp", ref_logp, ndim=2)
    check_same_shape(fn, logp=logp, ref_logp=ref_logp)
    check_rows(fn, "scores", scores, logp)
    mask = check_mask(fn, mask, logp.shape)
    check_finite(fn, "scores", scores)
    check_finite(fn, "logp", logp, mask)
    check_finite(fn, "ref_logp", ref_logp, mask)
    return mask
