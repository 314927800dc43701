"""RoPE against an independent complex-number formulation, Hugging Face's frequency functions and its rotate_half.

Notation: B batch, H heads, T positions, D head dim, R rotated dims.

The reference rotation views each rotated pair ``(a, b)`` as the complex number ``a + i b`` and multiplies it by
``exp(i * pos * theta_j)`` with ``theta_j = base^(-2j/R)`` (Su et al., eq. 34), in float64 with frequencies computed by
plain Python ``math``. The interleaved layout pairs dims ``(2j, 2j+1)``; the half layout pairs ``(j, j + R/2)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.nn import Transformer, apply_rope, rope_cos_sin, rope_inv_freq


def complex_rope_reference(
    x: torch.Tensor, positions: torch.Tensor, rot: int, base: float, layout: str
) -> torch.Tensor:
    """Rotate the first ``rot`` dims of x ``(..., T, D)`` by complex multiplication, in float64."""
    x = x.double()
    theta = torch.tensor([base ** (-2.0 * j / rot) for j in range(rot // 2)], dtype=torch.float64)  # (R/2,)
    angle = positions.double()[:, None] * theta[None, :]  # (T, R/2)
    phasor = torch.polar(torch.ones_like(angle), angle)  # e^{i * pos * theta}, (T, R/2)
    head, tail = x[..., :rot], x[..., rot:]
    if layout == "interleaved":
        pairs = torch.view_as_complex(head.reshape(*head.shape[:-1], rot // 2, 2).contiguous())  # (..., T, R/2)
        rotated = torch.view_as_real(pairs * phasor).flatten(-2)  # (..., T, R)
    else:
        pairs = torch.complex(head[..., : rot // 2], head[..., rot // 2 :])  # (..., T, R/2)
        out = pairs * phasor
        rotated = torch.cat((out.real, out.imag), dim=-1)  # (..., T, R)
    return torch.cat((rotated, tail), dim=-1)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("partial", [1.0, 0.5, 0.25])
def test_apply_rope_matches_complex_formulation(layout: str, partial: float) -> None:
    torch.manual_seed(0)
    d, base = 32, 10000.0
    rot = int(d * partial)
    x = torch.randn(2, 3, 11, d)  # (B, H, T, D)
    positions = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34, 100, 2047])
    cos, sin = rope_cos_sin(positions, rot, base, layout=layout)  # (T, R)
    out = apply_rope(x, cos, sin, layout)
    ref = complex_rope_reference(x, positions, rot, base, layout)
    # float32 angles: pos * theta rounds by ~pos * 2^-24 rad, 1.2e-4 at position 2047, times |x| <= ~4
    torch.testing.assert_close(out.double(), ref, atol=5e-4, rtol=0)
    # the tail beyond the rotated dims is passed through bit for bit
    assert torch.equal(out[..., rot:], x[..., rot:])


def test_apply_rope_batched_positions_match_per_row() -> None:
    """cos/sin of shape (B, T, R) (positions from a padding mask) rotate each row with its own positions."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 5, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # (B, T): row 1 left-padded by two
    cos, sin = rope_cos_sin(pos, 16)  # (B, T, R)
    out = apply_rope(x, cos, sin)
    for b in range(2):
        ref = complex_rope_reference(x[b], pos[b], 16, 10000.0, "half")
        torch.testing.assert_close(out[b].double(), ref, atol=2e-5, rtol=1e-5)


def test_layouts_equal_up_to_permutation() -> None:
    """half(x)[perm] == interleaved(x[perm]) with perm = [0, R/2, 1, R/2 + 1, ...]."""
    torch.manual_seed(2)
    r = 16
    perm = torch.stack((torch.arange(r // 2), torch.arange(r // 2) + r // 2), dim=-1).flatten()  # (R,)
    x = torch.randn(1, 2, 7, r)
    pos = torch.arange(7)
    half = apply_rope(x, *rope_cos_sin(pos, r, layout="half"), "half")
    inter = apply_rope(x[..., perm], *rope_cos_sin(pos, r, layout="interleaved"), "interleaved")
    torch.testing.assert_close(half[..., perm], inter, atol=1e-6, rtol=1e-6)


def test_model_layouts_equal_after_permuting_qk_rows() -> None:
    """A half-layout model equals an interleaved one whose q/k projection rows are permuted within each head."""
    torch.manual_seed(3)
    common = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, init_std=0.1)
    half = Transformer(TransformerConfig(**common, rope_layout="half")).eval()
    inter = Transformer(TransformerConfig(**common, rope_layout="interleaved")).eval()
    d = half.config.head_dim
    perm = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=-1).flatten()  # (D,)
    state = half.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = w.view(-1, d, w.shape[-1])  # (heads, D, C)
            state[name] = heads[:, perm].reshape_as(w)
    inter.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(half(ids), inter(ids), atol=1e-5, rtol=1e-5)


def test_apply_rope_matches_hf_rotate_half() -> None:
    """Against transformers' Llama ``apply_rotary_pos_emb`` with its own rotary embedding (default rope)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(4)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=500000.0)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(q, pos)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = rope_cos_sin(pos, 16, 500000.0)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- scaling variants
def _hf_inv_freq(rope_parameters: dict, head_dim: int, max_pos: int, partial: float = 1.0, seq_len: int | None = None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 10000.0, **rope_parameters}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    cfg = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)


SCALINGS = [
    {"type": "linear", "factor": 4.0},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5},
    {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {
        "type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 128,
    },
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["type"])
@pytest.mark.parametrize("head_dim,partial", [(32, 1.0), (64, 0.25)])
def test_rope_inv_freq_matches_hf(scaling: dict, head_dim: int, partial: float) -> None:
    hf_params = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    hf_inv, hf_factor = _hf_inv_freq(hf_params, head_dim, max_pos=128, partial=partial)
    inv, factor = rope_inv_freq(int(head_dim * partial), 10000.0, scaling, max_position=128)
    torch.testing.assert_close(inv, hf_inv.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-9)


@pytest.mark.parametrize("seq_len", [64, 128, 300, 1000])
def test_dynamic_ntk_matches_hf(seq_len: int) -> None:
    """Dynamic NTK: cos/sin for positions 0..seq_len-1 use the base HF derives for that length."""
    hf_inv, _ = _hf_inv_freq({"rope_type": "dynamic", "factor": 2.0}, 32, max_pos=128, seq_len=seq_len)
    pos = torch.arange(seq_len)
    cos, sin = rope_cos_sin(pos, 32, 10000.0, {"type": "dynamic", "factor": 2.0}, max_position=128)
    angles = pos.double()[:, None] * hf_inv.double()[None]  # (T, R/2)
    ref = torch.cat((angles, angles), dim=-1)  # (T, R) half layout
    torch.testing.assert_close(cos.double(), ref.cos(), atol=2e-4, rtol=0)
    torch.testing.assert_close(sin.double(), ref.sin(), atol=2e-4, rtol=0)


def test_yarn_attention_factor_scales_cos_sin() -> None:
    """YaRN multiplies cos and sin by 0.1 ln(s) + 1 (REFERENCES.md)."""
    scaling = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32}
    pos = torch.arange(5)
    cos, sin = rope_cos_sin(pos, 16, 10000.0, scaling, max_position=512)
    mscale = 0.1 * math.log(16.0) + 1
    torch.testing.assert_close(cos[0], torch.full((16,), mscale), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.full((5, 16), mscale**2), atol=1e-5, rtol=0)


def test_llama3_formula_by_hand() -> None:
    """Llama 3.1 scaling, transcribed from REFERENCES.md: keep short wavelengths, divide long ones, blend between."""
    dim, base, factor, lo, hi, orig = 32, 500000.0, 8.0, 1.0, 4.0, 8192
    inv, _ = rope_inv_freq(
        dim,
        base,
        {
            "type": "llama3",
            "factor": factor,
            "low_freq_factor": lo,
            "high_freq_factor": hi,
            "original_max_position_embeddings": orig,
        },
    )
    for j in range(dim // 2):
        f = base ** (-2 * j / dim)
        wavelen = 2 * math.pi / f
        if wavelen < orig / hi:
            expected = f
        elif wavelen > orig / lo:
            expected = f / factor
        else:
            smooth = (orig / wavelen - lo) / (hi - lo)
            expected = (1 - smooth) * f / factor + smooth * f
        assert inv[j].item() == pytest.approx(expected, rel=1e-5)


def test_cos_sin_float32_under_bf16_autocast() -> None:
    pos = torch.arange(4096)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope_cos_sin(pos, 64, 10000.0)
        x = torch.randn(1, 1, 4096, 64, dtype=torch.bfloat16)
        out = apply_rope(x, cos, sin)
    assert cos.dtype == sin.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    ref = complex_rope_reference(x.float(), pos, 64, 10000.0, "half")
    # float32 angles: at position 4095 a bf16 angle would be off by up to ~8 rad; here only the bf16 output rounds
    torch.testing.assert_close(out.double(), ref, atol=0.06, rtol=0.02)


def test_model_rope_positions_follow_mask_and_cache() -> None:
    """The model's attention inputs carry cos/sin of positions 0.. from the mask (left padding) in float32."""
    cfg = TransformerConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = Transformer(cfg)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    inputs = model.attention_inputs(2, 4, torch.device("cpu"), mask, None, None)
    assert inputs.q_pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    cos, _ = rope_cos_sin(torch.tensor([0, 1, 2, 3]), 8)
    torch.testing.assert_close(inputs.cos[1], cos)
    assert inputs.cos.dtype == torch.float32
