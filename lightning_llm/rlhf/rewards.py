"""Reward functions with TRL's signature, resolved from configs and checked (plain Python / torch).

A reward function is ``fn(prompts, completions, **kwargs) -> list[float]``: one finite float per completion, as
TRL's ``GRPOTrainer`` / ``RLOOTrainer`` call them. :func:`resolve_reward_function` accepts a callable, an import path
``"package.module.function"`` or a ``{"class_path", "init_args"}`` dict (how the CLI passes an object);
:func:`weighted_reward_scores` calls several and returns their weighted sum after checking every value.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["RewardFunction", "reward_function_name", "resolve_reward_function", "weighted_reward_scores"]

RewardFunction = Callable[..., Sequence[float]]


def resolve_reward_function(spec: Any) -> RewardFunction:
    """A reward function from a callable, an import path ``"package.module.function"``, or a
    ``{"class_path": ..., "init_args": {...}}`` dict."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and "." in spec:
        module, _, name = spec.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward function {spec!r} could not be imported: {err}.") from err
        if not callable(fn):
            raise TypeError(f"reward function {spec!r} is not callable.")
        return fn
    if isinstance(spec, dict) and "class_path" in spec:
        cls = resolve_reward_function(spec["class_path"])
        return cls(**(spec.get("init_args") or {}))
    raise TypeError(
        f"A reward function must be a callable `fn(prompts, completions, **kwargs) -> list[float]`, an import path "
        f"string or a {{'class_path', 'init_args'}} dict; got {spec!r}."
    )


def reward_function_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _checked_scores(fn: RewardFunction, values: Any, completions: Sequence[str], owner: str) -> torch.Tensor:
    """``values`` as a ``(B,)`` float32 tensor, or a ValueError naming the function, the problem and the fix."""
    name, b = reward_function_name(fn), len(completions)
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    if not isinstance(values, (list, tuple)) or len(values) != b:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(
            f"{owner}: reward function {name!r} returned {got} values for {b} completions; it must return a list "
            "with one float per completion (TRL signature fn(prompts, completions, **kwargs) -> list[float])."
        )
    try:
        arr = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: reward function {name!r} returned a non-number: {err}.") from err
    bad = (~torch.isfinite(arr)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"{owner}: reward function {name!r} returned a non-finite value {arr[i].item()} for completion {i} "
            f"({completions[i]!r}); return finite floats (e.g. 0.0 for 'no reward')."
        )
    return arr


def weighted_reward_scores(
    functions: Sequence[RewardFunction],
    weights: Sequence[float],
    prompts: list[str],
    completions: list[str],
    owner: str = "reward",
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum_i w_i * fn_i(prompts, completions, **kwargs), {name: values})``, each ``(B,)`` float32 on the CPU."""
    total = torch.zeros(len(completions), dtype=torch.float32)
    per_function: dict[str, torch.Tensor] = {}
    for fn, w in zip(functions, weights):
        values = _checked_scores(fn, fn(prompts=prompts, completions=completions, **kwargs), completions, owner)
        per_function[reward_function_name(fn)] = values
        total += w * values
    return total, per_function
