"""ALiBi slopes and bias against the paper's formula, hand values and Hugging Face BLOOM's ``build_alibi_tensor``.

Notation: B batch, H heads, Tq queries, Tk keys.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_llm.nn import alibi_bias, alibi_slopes


def paper_slopes(n: int) -> list[float]:
    """Transcribed from Press et al.'s reference code (``get_slopes`` in the ALiBi repository)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n_head", range(1, 65))
def test_slopes_match_paper_formula(n_head: int) -> None:
    expected = torch.tensor(paper_slopes(n_head), dtype=torch.float64)
    got = alibi_slopes(n_head)
    assert got.shape == (n_head,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


def test_slopes_by_hand() -> None:
    # 8 heads: 1/2, 1/4, ..., 1/256 (REFERENCES.md)
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    # 12 heads: 2^-1 .. 2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (deliberately unsorted)
    expected_12 = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(
        alibi_slopes(12).double(), torch.tensor(expected_12, dtype=torch.float64), rtol=1e-7, atol=0
    )
    # 1 head: 2^-8
    assert alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize("n_head", [1, 3, 4, 6, 12, 16, 20, 32, 40, 64])
def test_slopes_match_hf_bloom(n_head: int) -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 3, dtype=torch.long)
    alibi = build_alibi_tensor(mask, n_head, torch.float32)  # (B*H, 1, S): slope_h * position
    torch.testing.assert_close(alibi_slopes(n_head), alibi[:, 0, 1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.0, "4"])
def test_slopes_reject_bad_head_count(bad) -> None:
    with pytest.raises(ValueError, match="n_head"):
        alibi_slopes(bad)


def test_alibi_bias_matches_loop() -> None:
    slopes = alibi_slopes(6)
    q_pos = torch.tensor([[3, 4], [0, 1]])  # (B, Tq)
    k_pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]])  # (B, Tk)
    bias = alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (2, 6, 2, 5)
    for b in range(2):
        for h in range(6):
            for i in range(2):
                for j in range(5):
                    expected = slopes[h].item() * (k_pos[b, j].item() - q_pos[b, i].item())
                    assert bias[b, h, i, j].item() == pytest.approx(expected, abs=1e-7)


def test_bloom_left_padding_positions_agree() -> None:
    """BLOOM builds ALiBi from the mask's cumulative sum; our model derives its positions the same way."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from lightning_llm.config import TransformerConfig
    from lightning_llm.nn import Transformer

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    hf = build_alibi_tensor(mask, 4, torch.float32).view(2, 4, 1, 5)  # (B, H, 1, S): m_h * key position (0 on pads)
    model = Transformer(
        TransformerConfig(vocab_size=8, block_size=8, n_layer=1, n_head=4, n_embd=16, pos_encoding="alibi")
    )
    inputs = model.attention_inputs(2, 5, torch.device("cpu"), mask, None, None)
    ours = alibi_bias(alibi_slopes(4), inputs.q_pos[:, :1] * 0, inputs.k_pos)  # (B, H, 1, S): m_h * key position
    real = mask.bool()[:, None, None, :].expand_as(hf)
    torch.testing.assert_close(ours[real], hf[real])
