"""Shared base of the metric classes: float states stay float64 through ``.to(dtype)`` / ``.half()``.

torchmetrics guards ``.half()``/``.float()``/``.double()`` but not ``module.to(dtype)``, which Lightning's
``precision="bf16-true"`` / ``"16-true"`` applies to the whole LightningModule, metrics included: a float64 NLL
sum would silently become bfloat16. Here every floating state is cast back to float64 after any ``_apply``
unless the user asked for it explicitly with ``metric.set_dtype(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric


def _keep64(value: object) -> object:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    if isinstance(value, list):
        return [_keep64(v) for v in value]
    return value


class Float64StateMetric(Metric):
    """A ``Metric`` whose floating-point states are always float64 (unless changed with ``set_dtype``).

    Every state is a sum (or a fixed-size tensor of sums), so ``forward`` never needs the full state:
    ``full_state_update = False`` for all subclasses.
    """

    full_state_update = False

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> Module:
        this = super()._apply(fn, exclude_state)
        if not self._dtype_convert:
            for key in this._defaults:
                this._defaults[key] = _keep64(this._defaults[key])
                setattr(this, key, _keep64(getattr(this, key)))
        return this

    def _add_sum_states(self, **dtypes: torch.dtype) -> None:
        """Register one zero scalar state per keyword (name=dtype), each summed across processes, in the given order."""
        for name, dtype in dtypes.items():
            self.add_state(name, default=torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")
