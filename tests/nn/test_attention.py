"""Attention kernels against each other and against a naive per-head loop; the ``auto`` backend choice.

Notation: B batch, H query heads, G key/value heads, T tokens, D head dim, C width.
"""

from __future__ import annotations

import math

import pytest
import torch

import lightning_llm.nn.attention as attention_mod
from lightning_llm.config import TransformerConfig
from lightning_llm.nn import Transformer, alibi_bias, alibi_slopes
from lightning_llm.nn.attention import AttentionInputs, CausalSelfAttention, flex_available


def tiny(pos: str, n_kv_head: int, backend: str = "auto", **kw) -> TransformerConfig:
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.1)
    return TransformerConfig(**{**base, **kw}, n_kv_head=n_kv_head, pos_encoding=pos, attention_backend=backend)


def same_weights(cfg: TransformerConfig, backend: str, source: Transformer) -> Transformer:
    model = Transformer(TransformerConfig(**{**cfg.to_dict(), "attention_backend": backend}))
    model.load_state_dict(source.state_dict())
    return model.eval()


@pytest.fixture
def eager_flex(monkeypatch):
    """Run FlexAttention uncompiled (unfused eager on CPU): tests our score_mod / block_mask without a 15 s compile."""
    if not flex_available():
        pytest.skip("torch.nn.attention.flex_attention is not available")
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(attention_mod, "_compiled_flex", flex_attention)
    monkeypatch.setattr(attention_mod, "_block_masks", {})


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed, bias) -> torch.Tensor:
    """Loop over batch and heads: head h reads kv head h // (H / G); ``allowed(b, i, j)``, ``bias(b, h, i, j)``."""
    b_, h_, t_, d_ = q.shape
    g_ = k.shape[1]
    out = torch.zeros(b_, h_, t_, d_, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            g = h // (h_ // g_)
            for i in range(t_):
                scores = []
                for j in range(k.shape[2]):
                    if allowed(b, i, j):
                        scores.append(
                            float(q[b, h, i].double() @ k[b, g, j].double()) / math.sqrt(d_) + bias(b, h, i, j)
                        )
                    else:
                        scores.append(-math.inf)
                p = torch.tensor(scores, dtype=torch.float64).softmax(-1)
                out[b, h, i] = p @ v[b, g].double()
    return out


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("pos", ["alibi", "none"])
def test_attention_module_matches_naive_loop(backend: str, n_kv_head: int, pos: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(pos, n_kv_head, backend)
    attn = CausalSelfAttention(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, cfg.n_embd)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    q_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) positions from the mask
    slots = torch.arange(6)
    allowed = (slots[None, :] <= slots[:, None])[None] & mask[:, None, :]  # (B, T, S)
    allowed = allowed | torch.eye(6, dtype=torch.bool)[None]  # a pad query sees itself
    inputs = AttentionInputs(None, None, allowed[:, None], q_pos, q_pos, is_causal=False)
    with torch.no_grad():
        out = attn(x, inputs)
        q = attn.q_proj(x).view(2, 6, 4, -1).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(x).view(2, 6, n_kv_head, -1).transpose(1, 2)  # (B, G, T, D)
        v = attn.v_proj(x).view(2, 6, n_kv_head, -1).transpose(1, 2)  # (B, G, T, D)
    slopes = alibi_slopes(4).tolist()

    def bias(b, h, i, j):
        return slopes[h] * float(q_pos[b, j] - q_pos[b, i]) if pos == "alibi" else 0.0

    ref = naive_attention(q, k, v, lambda b, i, j: bool(allowed[b, i, j]), bias)  # (B, H, T, D)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 6, -1).float())
    real = mask[:, :, None].expand_as(out)  # pad rows produce finite garbage that nobody reads
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("pos", ["alibi", "rope", "learned"])
def test_backends_agree_on_logits_and_gradients(pos: str, n_kv_head: int) -> None:
    torch.manual_seed(1)
    cfg = tiny(pos, n_kv_head)
    source = Transformer(cfg)
    ids = torch.randint(0, 61, (2, 16))
    targets = torch.randint(0, 61, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding in row 0
    results = {}
    for backend in ("eager", "sdpa"):
        model = same_weights(cfg, backend, source)
        logits = model(ids)
        padded = model(ids, attention_mask=mask)
        loss = model(ids, targets=targets)
        loss.backward()
        results[backend] = (logits, padded, loss, [p.grad for p in model.parameters()])
    (l_e, p_e, loss_e, g_e), (l_s, p_s, loss_s, g_s) = results["eager"], results["sdpa"]
    torch.testing.assert_close(l_s, l_e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_s[mask.bool()], p_e[mask.bool()], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_s, loss_e, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_s, g_e):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.usefixtures("eager_flex")
def test_flex_alibi_matches_eager() -> None:
    """Grouped-query ALiBi through FlexAttention (score_mod + block_mask, enable_gqa) equals the eager reference."""
    torch.manual_seed(2)
    cfg = tiny("alibi", 2)
    source = Transformer(cfg)
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():  # FlexAttention has no CPU backward
        ref = same_weights(cfg, "eager", source)(ids)
        flex_model = same_weights(cfg, "flex", source)
        calls = []
        original = flex_model.blocks[0].attn._flex
        flex_model.blocks[0].attn._flex = lambda *a: calls.append(1) or original(*a)
        out = flex_model(ids)
        assert calls, "the flex backend was not used"
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        # padding and a KV cache are outside the flex kernel here: forced "flex" falls back to SDPA, still exact
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, :7] = 0
        torch.testing.assert_close(
            flex_model(ids, attention_mask=mask)[mask.bool()],
            same_weights(cfg, "eager", source)(ids, attention_mask=mask)[mask.bool()],
            atol=2e-5,
            rtol=1e-4,
        )
        cache = flex_model.new_kv_cache(2, 20)
        flex_model(ids[:, :12], kv_cache=cache)
        torch.testing.assert_close(flex_model(ids[:, 12:], kv_cache=cache), ref[:, 12:], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_flex_alibi_matches_eager() -> None:
    """The real compiled FlexAttention path (compiling on CPU takes ~15 s)."""
    if not flex_available():
        pytest.skip("no flex attention")
    torch.manual_seed(3)
    cfg = tiny("alibi", 2)
    source = Transformer(cfg)
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            same_weights(cfg, "flex", source)(ids), same_weights(cfg, "eager", source)(ids), atol=2e-5, rtol=1e-4
        )


def test_auto_backend_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pos = torch.arange(4)[None]
    plain = AttentionInputs(None, None, None, pos, pos, is_causal=True)
    padded = AttentionInputs(None, None, torch.ones(1, 1, 4, 4, dtype=torch.bool), pos, pos, is_causal=False)
    alibi = CausalSelfAttention(tiny("alibi", 2)).eval()
    rope = CausalSelfAttention(tiny("rope", 2)).eval()
    # CPU: always SDPA (float-bias path for ALiBi; unfused eager Flex on CPU is slow)
    assert alibi.backend(plain, cpu) == "sdpa"
    assert rope.backend(plain, cpu) == "sdpa"
    # CUDA: Flex for ALiBi with plain causal attention, SDPA with padding/cache, SDPA (flash) without bias
    assert alibi.backend(plain, cuda) == ("flex" if flex_available() else "sdpa")
    assert alibi.backend(padded, cuda) == "sdpa"
    assert rope.backend(plain, cuda) == "sdpa"
    # attention dropout in training: Flex does not implement it, SDPA does
    dropping = CausalSelfAttention(tiny("alibi", 2, dropout=0.1)).train()
    assert dropping.backend(plain, cuda) == "sdpa"
    # an explicit choice is always respected
    for forced in ("eager", "sdpa", "flex"):
        assert CausalSelfAttention(tiny("alibi", 2, forced)).backend(plain, cpu) == forced


def test_sdpa_without_bias_uses_is_causal(monkeypatch) -> None:
    """No bias and no padding: SDPA gets ``is_causal=True`` and no mask (what lets CUDA take the flash kernel)."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    model = Transformer(tiny("rope", 2)).eval()
    model(torch.randint(0, 61, (2, 8)))
    assert seen and all(no_mask and causal for no_mask, causal in seen)
    seen.clear()
    Transformer(tiny("alibi", 2)).eval()(torch.randint(0, 61, (2, 8)))
    assert seen and all(not no_mask and not causal for no_mask, causal in seen)  # ALiBi: float bias with causal -inf


def test_alibi_bias_built_once_per_forward(monkeypatch) -> None:
    model = Transformer(tiny("alibi", 2, n_layer=3)).eval()
    calls = []
    real = torch.Tensor.masked_fill

    def spy(self, *args, **kwargs):
        calls.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "masked_fill", spy)
    helper = []  # the bias comes from the tested nn.alibi.alibi_bias, not from a copy of its math
    monkeypatch.setattr(attention_mod, "alibi_bias", lambda *a: helper.append(1) or alibi_bias(*a))
    model(torch.randint(0, 61, (2, 8)))
    assert len(calls) == 1 and len(helper) == 1


def test_alibi_slopes_must_match_the_local_heads() -> None:
    """Slopes sliced for fewer heads than q_proj gives (a sharding plan that forgot the projections) raise."""
    attn = CausalSelfAttention(tiny("alibi", 2)).eval()
    attn.alibi_slopes = attn.alibi_slopes[:2]
    pos = torch.arange(4)[None]
    with pytest.raises(ValueError, match="alibi_slopes` holds 2 slopes but the query projection gives 4 heads"):
        attn(torch.randn(1, 4, 32), AttentionInputs(None, None, None, pos, pos, is_causal=True))
