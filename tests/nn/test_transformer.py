"""The Transformer: it can learn (overfit one batch), it materialises from the meta device, and its parts match formulas.

Notation: B batch, T tokens, C width, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_llm.config import TransformerConfig
from lightning_llm.nn import RMSNorm, Transformer, alibi_slopes, sinusoidal_embedding


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_tiny_model_overfits_one_batch(pos: str) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos_encoding=pos)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 64, (4, 33))
    x, y = ids[:, :-1], ids[:, 1:]  # (B, T) inputs and next-token targets
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    initial, steps = None, 0
    while steps < 300:
        loss = model(x, targets=y)
        initial = initial if initial is not None else loss.item()
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    # a random batch has no structure: the initial loss is ~ln(64) = 4.16 and only memorisation brings it below 0.1
    assert initial == pytest.approx(math.log(64), abs=0.3)
    assert loss.item() < 0.1, f"{pos}: loss {loss.item():.3f} after {steps} steps"


@pytest.mark.parametrize("pos", ["alibi", "rope", "learned"])
def test_meta_device_init(pos: str) -> None:
    cfg = TransformerConfig(vocab_size=40, block_size=16, n_layer=3, n_head=6, n_kv_head=3, n_embd=48, pos_encoding=pos)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.reset_parameters()
    ids = torch.randint(0, 40, (2, 10))
    out = model(ids)
    assert torch.isfinite(out).all()
    for block in model.blocks:
        if pos == "alibi":
            # 6 heads: 2^-2, 2^-4, 2^-6, 2^-8 (4 heads) then 2^-1, 2^-3 (every other of the 8-head sequence)
            expected = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
            assert torch.equal(block.attn.alibi_slopes, expected)
            assert block.attn.alibi_slopes.device.type == "cpu"
        # the init: N(0, 0.02) on weights, residual projections scaled by 1/sqrt(2 * n_layer), norms at one
        assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.15)
        assert torch.equal(block.norm_1.weight, torch.ones(48))
    # equals a model built directly on CPU with the same weights
    ref = Transformer(cfg)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref(ids), out)


def test_rmsnorm_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8, requires_grad=True)
    ref_x = x.detach().double().requires_grad_()
    ref = ref_x / torch.sqrt((ref_x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    out = norm(x)
    torch.testing.assert_close(out.double(), ref)
    g = torch.randn(3, 8)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)
    # bf16 input (Llama convention): normalise in float32, cast back to bf16, then multiply by the weight
    xb = torch.randn(3, 8).bfloat16()
    xf = xb.float()
    expected = norm.weight * (xf / torch.sqrt((xf**2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm.bfloat16()(xb), expected.bfloat16())


def test_sinusoidal_embedding_by_formula() -> None:
    pos = torch.tensor([0, 1, 5, 77])
    pe = sinusoidal_embedding(pos, 6)
    for a, p in enumerate(pos.tolist()):
        for i in range(3):  # Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(...)
            angle = p / 10000 ** (2 * i / 6)
            assert pe[a, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[a, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_block_variants_match_hand_written_forward() -> None:
    """Parallel residual with a shared norm (GPT-J) and a GELU MLP, recomputed by hand from the module's weights."""
    torch.manual_seed(1)
    cfg = TransformerConfig(
        vocab_size=20,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_embd=8,
        pos_encoding="none",
        norm="layernorm",
        mlp="gelu",
        gelu_approximate="tanh",
        bias=True,
        parallel_residual=True,
        shared_attention_norm=True,
        tie_embeddings=True,
        attention_backend="eager",
    )
    model = Transformer(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 20, (1, 5))
    blk = model.blocks[0]
    x = model.wte.weight[ids]  # (B, T, C)
    h = F.layer_norm(x, (8,), blk.norm_1.weight, blk.norm_1.bias, 1e-5)
    q = (h @ blk.attn.q_proj.weight.T + blk.attn.q_proj.bias).view(1, 5, 2, 4).transpose(1, 2)  # (B, H, T, D)
    k = (h @ blk.attn.k_proj.weight.T + blk.attn.k_proj.bias).view(1, 5, 2, 4).transpose(1, 2)
    v = (h @ blk.attn.v_proj.weight.T + blk.attn.v_proj.bias).view(1, 5, 2, 4).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 8) @ blk.attn.o_proj.weight.T + blk.attn.o_proj.bias
    up = h @ blk.mlp.up_proj.weight.T + blk.mlp.up_proj.bias
    m = F.gelu(up, approximate="tanh") @ blk.mlp.down_proj.weight.T + blk.mlp.down_proj.bias
    out = F.layer_norm(x + a + m, (8,), model.norm_f.weight, model.norm_f.bias, 1e-5) @ model.wte.weight.T
    torch.testing.assert_close(model(ids), out, atol=1e-5, rtol=1e-4)
    assert blk.norm_2 is None and model.lm_head is None


def test_swiglu_mlp_by_hand() -> None:
    torch.manual_seed(2)
    cfg = TransformerConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, intermediate_size=12)
    mlp = Transformer(cfg).blocks[0].mlp
    x = torch.randn(3, 8)
    ref = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref)


def test_dropout_trains_and_eval_is_deterministic() -> None:
    torch.manual_seed(3)
    model = Transformer(TransformerConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    ids = torch.randint(0, 20, (2, 6))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_alibi_slopes_buffer_is_not_saved() -> None:
    model = Transformer(
        TransformerConfig(vocab_size=20, block_size=8, n_layer=1, n_head=4, n_embd=16, pos_encoding="alibi")
    )
    assert not any("alibi" in k for k in model.state_dict())
    assert torch.equal(model.blocks[0].attn.alibi_slopes, alibi_slopes(4))


def test_forward_bad_inputs() -> None:
    model = Transformer(TransformerConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))


def test_compiled_forward_still_checks_ids():
    """``_check_ids`` runs eagerly under ``torch.compile`` (one graph break, not a trace of its host-side values): a
    compiled model rejects out-of-vocabulary ids as the eager one does, and computes the same outputs."""
    torch._dynamo.reset()
    cfg = TransformerConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask), model(ids, attention_mask=mask))
        with pytest.raises(ValueError, match="vocab_size"):
            compiled(torch.full((2, 6), 40), attention_mask=mask)
        # no host read of the attention mask (all ones included) breaks the graph
        for m in (mask, torch.ones_like(mask)):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(ids, attention_mask=m)
            assert not any("item()" in r.reason for r in explained.break_reasons), explained.break_reasons
            assert explained.graph_count == 1
            torch.testing.assert_close(compiled(ids, attention_mask=m), model(ids, attention_mask=m))
