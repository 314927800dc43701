"""Input validation shared by the functional metrics (plain torch).

Every check raises ``TypeError`` (wrong type / dtype) or ``ValueError`` (wrong shape / value) with a message
that names the argument, what was expected, what was received, and how to fix it.

Notation:
    B: batch size (sequences), T: sequence length, V: vocabulary size, N: number of instances.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, received {type(x).__name__}. Fix: wrap it with torch.as_tensor."
        )
    return x


def _check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or float64), received dtype {x.dtype}."
            f" Fix: pass the model's raw float output, not token ids or an argmax; cast with `{name}.float()` if needed."
        )


def _check_ignore_index(ignore_index: object, name: str = "ignore_index") -> None:
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(
            f"`{name}` must be None or an int, received {ignore_index!r} ({type(ignore_index).__name__})."
            f" Fix: pass the integer label used for padding, e.g. {name}=-100."
        )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, received {value!r}. Fix: pass e.g. {name}=10.")


def _check_logits_target(logits: object, target: object) -> tuple[Tensor, Tensor]:
    """Check ``logits`` (B, T, V) float and ``target`` (B, T) integer; return target as int64."""
    logits = _check_tensor("logits", logits)
    target = _check_tensor("target", target)
    if logits.ndim != 3:
        raise ValueError(
            f"`logits` must have shape (B, T, V) = (batch, sequence, vocabulary), received shape {tuple(logits.shape)}."
            " Fix: for a single sequence use `logits.unsqueeze(0)`; for (B*T, V) use `logits.view(B, T, V)`."
        )
    if target.ndim != 2:
        raise ValueError(
            f"`target` must have shape (B, T) matching logits[:, :, 0], received shape {tuple(target.shape)}."
            " Fix: pass token ids shaped like the first two dimensions of `logits`."
        )
    if logits.shape[:2] != target.shape:
        raise ValueError(
            f"`logits` (B, T, V) and `target` (B, T) must agree on (B, T): received logits {tuple(logits.shape)} and"
            f" target {tuple(target.shape)}. Fix: shift before scoring, `logits[:, :-1]` with `input_ids[:, 1:]`."
        )
    _check_float("logits", logits)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"`target` must hold integer token ids (torch.int64), received dtype {target.dtype}."
            " Fix: pass `target.long()` (token ids, not probabilities or one-hot vectors)."
        )
    if logits.shape[-1] == 0:
        raise ValueError("`logits` has an empty vocabulary dimension (V = 0). Fix: pass logits with V >= 1 classes.")
    return logits, target.long()


def _check_target_range(target: Tensor, valid: Tensor, vocab_size: int, ignore_index: int | None) -> None:
    """Check that every non-ignored target lies in [0, V) (one host sync)."""
    bad = valid & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        values = target[bad].unique()[:5].tolist()
        hint = (
            f" Fix: set ignore_index={values[0]} if that value marks padding"
            if ignore_index is None and len(values) and values[0] < 0
            else " Fix: check that the tokenizer matches the model (same vocabulary), or mark padding with ignore_index"
        )
        raise ValueError(
            f"`target` contains token ids outside the vocabulary [0, {vocab_size}) of `logits`: received {values}"
            f" (ignore_index={ignore_index}).{hint}."
        )


def _check_confidence_correct(confidence: object, correct: object) -> tuple[Tensor, Tensor]:
    """Check confidences in [0, 1] (finite, float) and 0/1 correctness; return both flattened as float64."""
    confidence = _check_tensor("confidence", confidence)
    correct = _check_tensor("correct", correct)
    _check_float("confidence", confidence)
    if confidence.shape != correct.shape:
        raise ValueError(
            f"`confidence` and `correct` must have the same shape (one value per instance), received"
            f" {tuple(confidence.shape)} and {tuple(correct.shape)}. Fix: pass one confidence and one 0/1 correctness"
            " flag per instance."
        )
    conf = confidence.detach().reshape(-1).to(torch.float64)  # (N,)
    corr = correct.detach().reshape(-1)  # (N,)
    if corr.is_complex():
        raise TypeError(f"`correct` must be bool, integer or float 0/1 values, received dtype {correct.dtype}.")
    corr = corr.to(torch.float64)
    if conf.numel():
        if not bool(torch.isfinite(conf).all()):
            raise ValueError(
                "`confidence` contains NaN or inf. Expected probabilities in [0, 1]. Fix: check the model output"
                " (e.g. a log-probability of -inf gives exp(-inf) = 0, but NaN logits propagate)."
            )
        lo, hi = float(conf.min()), float(conf.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"`confidence` must lie in [0, 1], received values in [{lo}, {hi}]. Fix: pass probabilities, not"
                " logits or log-probabilities (use torch.sigmoid / .exp() / multiple_choice_confidence)."
            )
        if not bool(((corr == 0) | (corr == 1)).all()):
            bad = corr[(corr != 0) & (corr != 1)].unique()[:5].tolist()
            raise ValueError(
                f"`correct` must contain only 0/1 (or False/True) per instance, received values such as {bad}."
                " Fix: threshold partial scores (e.g. `correct = exact_match >= 1`)."
            )
    return conf, corr


def _check_logprobs_mask(
    logprobs: object,
    mask: object | None,
    validate_args: bool = True,
    name: str = "logprobs",
    allow_neg_inf: bool = False,
) -> tuple[Tensor, Tensor]:
    """Check float ``logprobs`` (<= 0, finite at scored positions; ``-inf`` too if ``allow_neg_inf``) and a bool
    ``mask`` of the same shape (``None``: all True); return both."""
    logprobs = _check_tensor(name, logprobs)
    _check_float(name, logprobs)
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    mask = _check_tensor("mask", mask)
    if mask.shape != logprobs.shape:
        raise ValueError(
            f"`mask` must have the same shape as `{name}` (one flag per token), received {tuple(mask.shape)} and"
            f" {tuple(logprobs.shape)}. Fix: pass the attention/loss mask aligned with the scored tokens."
        )
    if mask.is_floating_point() and validate_args and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("`mask` must contain only 0/1 or False/True. Fix: pass a boolean mask of scored tokens.")
    mask = mask.bool()
    if validate_args and mask.any():
        scored = logprobs[mask]
        ok = ~torch.isnan(scored) & (scored != float("inf")) if allow_neg_inf else torch.isfinite(scored)
        if not bool(ok.all()):
            raise ValueError(
                f"`{name}` contains NaN or inf at a scored (mask=True) position. Expected finite log-probabilities"
                " <= 0. Fix: mask padding with `mask`, or check the scoring model for overflow."
            )
        if float(scored.max()) > 1e-5:
            raise ValueError(
                f"`{name}` must be log-probabilities (<= 0), received a value {float(scored.max()):.4g} > 0."
                " Fix: pass `lightning_llm.ops.token_logprobs(logits, target)`, not raw logits or probabilities."
            )
    return logprobs, mask
