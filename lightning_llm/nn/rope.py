"""Rotary position embeddings (RoPE) and their context-extension variants.

Notation: B batch, H heads, T sequence length, D head dim, R = rotated dims (``D * partial_rotary_factor``).

The inverse frequencies are ``base^(-2i/R)``, i = 0..R/2-1. Two layouts pair dimensions differently:
``half`` rotates (i, i + R/2) (Hugging Face ``rotate_half``, GPT-NeoX, Llama in HF); ``interleaved`` rotates
(2i, 2i+1) (GPT-J, Meta's original Llama). They are the same function up to a permutation of the q/k rows.
cos/sin are always computed in float32 (positions times frequencies lose precision in bf16) and cast at the end.

Scaling variants follow Hugging Face ``modeling_rope_utils`` so that converted checkpoints give identical logits:
``linear`` (position interpolation), ``dynamic`` NTK (base grows with the current length), ``yarn`` and ``llama3``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(
    dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None, max_position: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``(dim/2,)`` in float32 and the attention factor that multiplies cos and sin.

    Args:
        dim: number of rotated dimensions R.
        base: RoPE theta.
        scaling: ``None`` or a Hugging Face style ``rope_scaling`` dict with ``type``.
        max_position: the model's original context (``original_max_position_embeddings`` falls back to it).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or max_position
    if kind == "linear":
        return inv_freq / factor, 1.0
    if (
        kind == "dynamic"
    ):  # depends on the current length: see dynamic_ntk_base; at or below the original length it is plain
        return inv_freq, 1.0
    if kind == "llama3":
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        low_freq_wavelen = original / low_freq_factor
        high_freq_wavelen = original / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are divided by the factor, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
        interp, extrap = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
        return interp * (1 - extrapolation_weight) + extrap * extrapolation_weight, float(attention_factor)
    raise ValueError(f"Unknown rope scaling type {kind!r}; expected linear, dynamic, yarn or llama3.")


def dynamic_ntk_base(base: float, dim: int, factor: float, seq_len: int, original: int) -> float:
    """Dynamic NTK: ``base' = base * ((s * L / L_orig) - (s - 1)) ** (R / (R - 2))`` once L exceeds ``L_orig``."""
    if seq_len <= original:
        return base
    return base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))


def rope_cos_sin(
    positions: torch.Tensor,
    dim: int,
    base: float = 10000.0,
    scaling: dict[str, Any] | None = None,
    max_position: int | None = None,
    layout: str = "half",
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer ``positions`` (any shape ``(...,)``), returned as float32 ``(..., R)``.

    With ``layout="half"`` the R/2 angles are repeated as ``[a, a]``; with ``"interleaved"`` as ``[a0, a0, a1, a1, ...]``.
    """
    if scaling is not None and scaling["type"] == "dynamic":
        original = scaling.get("original_max_position_embeddings") or max_position
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 0
        base = dynamic_ntk_base(base, dim, float(scaling["factor"]), seq_len, original)
        inv_freq, attn_factor = rope_inv_freq(dim, base, None)
    else:
        inv_freq, attn_factor = rope_inv_freq(dim, base, scaling, max_position)
    inv_freq = inv_freq.to(positions.device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., R/2)
    if layout == "half":
        angles = torch.cat((angles, angles), dim=-1)  # (..., R)
    else:
        angles = torch.repeat_interleave(angles, 2, dim=-1)  # (..., R)
    return angles.cos() * attn_factor, angles.sin() * attn_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate the first R dims of ``x`` (B, H, T, D) with cos/sin (B, T, R) or (T, R); the rest pass through.

    The rotation is done in float32 and cast back to ``x.dtype``.
    """
    r = cos.shape[-1]
    if cos.dim() == 3:  # (B, T, R) -> (B, 1, T, R)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :r], x[..., r:]
    rot = rotate_half if layout == "half" else rotate_interleaved
    xf = x_rot.float()
    out = (xf * cos + rot(xf) * sin).to(x.dtype)
    if x_pass.shape[-1] == 0:
        return out
    return torch.cat((out, x_pass), dim=-1)
