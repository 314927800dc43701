"""KL coefficient controllers for RLHF-PPO (Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019).

Notation: ``beta`` the KL coefficient (``kl_coef``), ``KL`` the measured KL between policy and reference per
sequence (sum over response tokens, averaged over the batch), ``n_steps`` the number of samples (or steps) the
measurement covers.

Both controllers expose ``.value`` (the current ``beta``), ``.update(current_kl, n_steps)`` and
``state_dict() / load_state_dict()`` so a LightningModule can store them in its checkpoint (``on_save_checkpoint``)
and resume exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _as_float(fn: str, name: str, value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: `{name}` must be a scalar, got a tensor of shape {tuple(value.shape)}.")
        value = value.detach().float().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: `{name}` must be finite, got {value}. A NaN KL usually means NaN log-probabilities.")
    return float(value)


class FixedKLController:
    """A constant KL coefficient: ``update`` changes nothing.

    Args:
        kl_coef: the coefficient ``beta`` >= 0 (default 0.05, the PPO default of TRL's former PPOTrainer line).

    Example:
        >>> ctl = FixedKLController(0.05)
        >>> ctl.update(10.0, n_steps=64)
        >>> ctl.value
        0.05
    """

    def __init__(self, kl_coef: float = 0.05) -> None:
        kl_coef = _as_float("FixedKLController", "kl_coef", kl_coef)
        if kl_coef < 0:
            raise ValueError(f"FixedKLController: `kl_coef` must be >= 0, got {kl_coef}.")
        self.value = kl_coef

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op (kept for a uniform interface); still validates its inputs."""
        _as_float("FixedKLController.update", "current_kl", current_kl)
        _as_float("FixedKLController.update", "n_steps", n_steps)

    def state_dict(self) -> dict[str, Any]:
        """The controller's state, as plain Python numbers."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        if "value" not in state_dict:
            raise KeyError(f"FixedKLController.load_state_dict: missing key 'value' in {sorted(state_dict)}.")
        self.value = float(state_dict["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the measured KL towards ``target`` (Ziegler et al. 2019).

    ``beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n_steps / horizon)``

    i.e. a proportional controller on the log of ``beta``: KL above target raises the penalty, below lowers it, and
    the clip bounds the change to 20% per ``horizon`` steps.

    Args:
        init_kl_coef: starting ``beta`` > 0 (default 0.05).
        target: the KL to aim at, > 0, in the units ``update`` receives (TRL's former default 6 nats per sequence).
        horizon: steps over which a full 20% change can accumulate, > 0 (TRL's former default 10000).

    Example:
        >>> ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        >>> ctl.update(9.0, n_steps=100)  # error (9-6)/6 = 0.5 -> clipped to 0.2; 0.1 * (1 + 0.2 * 100/10000)
        >>> round(ctl.value, 6)
        0.1002
    """

    def __init__(self, init_kl_coef: float = 0.05, target: float = 6.0, horizon: float = 10000) -> None:
        fn = "AdaptiveKLController"
        init_kl_coef = _as_float(fn, "init_kl_coef", init_kl_coef)
        target = _as_float(fn, "target", target)
        horizon = _as_float(fn, "horizon", horizon)
        for name, v in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            if v <= 0:
                raise ValueError(f"{fn}: `{name}` must be > 0, got {v}. Use FixedKLController for a constant beta.")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Move ``value`` according to the KL measured over the last ``n_steps`` steps.

        Args:
            current_kl: the measured KL (same units as ``target``); a float or a 1-element tensor.
            n_steps: how many steps (samples) the measurement covers, >= 0.
        """
        fn = "AdaptiveKLController.update"
        kl = _as_float(fn, "current_kl", current_kl)
        n = _as_float(fn, "n_steps", n_steps)
        if n < 0:
            raise ValueError(f"{fn}: `n_steps` must be >= 0, got {n}.")
        proportional_error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + proportional_error * n / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (value and settings), as plain Python numbers."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        missing = {"value", "target", "horizon"} - set(state_dict)
        if missing:
            raise KeyError(f"AdaptiveKLController.load_state_dict: missing keys {sorted(missing)}.")
        self.value = float(state_dict["value"])
        self.target = float(state_dict["target"])
        self.horizon = float(state_dict["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"
