"""parallelize on a 1-rank mesh, tensor-parallel ALiBi slopes against a hand-sharded attention, mesh-aware clipping."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.alibi import alibi_slopes
from lightning_llm.nn.transformer import Transformer
from lightning_llm.parallel import apply_tensor_parallel, clip_grad_norm_, parallelize, shard_alibi_slopes


@pytest.fixture(scope="module")
def mesh():
    """A 1-rank gloo process group and a (data_parallel=1, tensor_parallel=1) mesh, as ModelParallelStrategy builds."""
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    if created:
        dist.destroy_process_group()


def _cfg(**kw) -> TransformerConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return TransformerConfig(**{**base, **kw})


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets=ids.roll(-1, 1))
    loss.backward()
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for n, p in model.named_parameters()
    }
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------------- parallelize
@pytest.mark.parametrize("options", [{}, {"activation_checkpointing": True}, {"compile": {"backend": "eager"}}])
def test_parallelize_matches_plain_model_and_is_idempotent(mesh, options):
    ref = Transformer(_cfg())
    model = copy.deepcopy(ref)
    parallelize(model, mesh, **options)
    params = [id(p) for p in model.parameters()]
    assert parallelize(model, mesh, **options) is model
    assert [id(p) for p in model.parameters()] == params  # the second call did nothing
    ids = torch.randint(0, 64, (2, 16))
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # state-dict names are those of the plain model (wrappers' prefixes stripped by torch's state-dict utilities)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    assert set(get_model_state_dict(model)) == set(ref.state_dict())
    for name, g in ref_grads.items():
        clean = [k for k in grads if k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") == name]
        torch.testing.assert_close(grads[clean[0]], g, rtol=1e-5, atol=1e-6)


def test_meta_init_is_materialised_with_the_model_init(mesh):
    with torch.device("meta"):
        model = Transformer(_cfg(pos_encoding="alibi", n_layer=4))
    parallelize(model, mesh)
    assert not any(p.is_meta for p in model.parameters())
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    # reset_parameters' init: N(0, 0.02) for q_proj, N(0, 0.02 / sqrt(2 * n_layer)) for residual projections, norms = 1
    assert abs(full["blocks.0.attn.q_proj.weight"].std().item() - 0.02) < 0.004
    assert abs(full["blocks.0.attn.o_proj.weight"].std().item() - 0.02 / 8**0.5) < 0.002
    assert torch.equal(full["norm_f.weight"], torch.ones(32))
    # ALiBi slopes for 4 heads: 2^-2, 2^-4, 2^-6, 2^-8 (Press et al.)
    torch.testing.assert_close(model.blocks[0].attn.alibi_slopes, torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))).all()


class _FakeMesh:
    def size(self):
        return 4

    def get_local_rank(self):
        return 0


@pytest.mark.parametrize("field,kw", [("n_kv_head", dict(n_kv_head=2)), ("n_head", dict(n_head=2, n_kv_head=2))])
def test_tensor_parallel_divisibility_error(field, kw):
    with pytest.raises(ValueError, match=f"tensor_parallel_size=4 must divide TransformerConfig.{field}"):
        apply_tensor_parallel(Transformer(_cfg(**kw)), _FakeMesh())


def test_parallelize_rejects_foreign_modules(mesh):
    with pytest.raises(TypeError, match="blocks"):
        parallelize(torch.nn.Linear(2, 2), mesh)


def test_clip_grad_norm_matches_torch():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    for m in (a, b, a2, b2):
        for p in m.parameters():
            p.grad = torch.full_like(p, 2.0) * (1 + p.detach())
    ours = clip_grad_norm_([*a.parameters(), *b.parameters()], 1.0)
    ref = torch.nn.utils.clip_grad_norm_([*a2.parameters(), *b2.parameters()], 1.0)
    torch.testing.assert_close(ours, ref)
    for p, q in zip([*a.parameters(), *b.parameters()], [*a2.parameters(), *b2.parameters()]):
        torch.testing.assert_close(p.grad, q.grad)


# ---------------------------------------------------------------------------------------------------- ALiBi under TP
def _shard_linear(linear: torch.nn.Linear, rows: slice | None = None, cols: slice | None = None) -> torch.nn.Linear:
    """What Colwise (rows = output features) / Rowwise (cols = input features, no bias) leave on one rank."""
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w[:, cols]
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    out.weight.data.copy_(w)
    return out


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("t", [2, 4])
def test_sharded_alibi_slopes_follow_the_heads(backend, t):
    """Shard one attention by hand the way Colwise/RowwiseParallel do (rank r keeps heads [r H/t, (r+1) H/t) of q/k/v
    and the matching input columns of o_proj); with shard_alibi_slopes' slopes, the ranks' partial outputs sum to the
    unsharded attention (any other choice of slopes, e.g. every rank taking the first H/t, changes the result)."""
    torch.manual_seed(0)
    cfg = _cfg(pos_encoding="alibi", n_head=8, n_kv_head=4, attention_backend=backend, init_std=0.2, n_layer=1)
    model = Transformer(cfg).eval()
    x = torch.randn(2, 12, cfg.n_embd)
    inputs = model.attention_inputs(2, 12, x.device, None, None, None)
    with torch.no_grad():
        ref = model.blocks[0].attn(x, inputs)
        total = torch.zeros_like(ref)
        d, hq, hkv = cfg.head_dim, cfg.n_head // t, cfg.n_kv_head // t
        for r in range(t):
            shard = copy.deepcopy(model)
            attn = shard.blocks[0].attn
            q_rows, kv_rows = slice(r * hq * d, (r + 1) * hq * d), slice(r * hkv * d, (r + 1) * hkv * d)
            attn.q_proj = _shard_linear(attn.q_proj, rows=q_rows)
            attn.k_proj = _shard_linear(attn.k_proj, rows=kv_rows)
            attn.v_proj = _shard_linear(attn.v_proj, rows=kv_rows)
            attn.o_proj = _shard_linear(attn.o_proj, cols=q_rows)
            shard_alibi_slopes(shard, t, r)
            torch.testing.assert_close(attn.alibi_slopes, alibi_slopes(8)[r * hq : (r + 1) * hq], rtol=0, atol=0)
            total += attn(x, shard.attention_inputs(2, 12, x.device, None, None, None))
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)


def test_shard_alibi_slopes_refuses_a_sharded_model_and_skips_other_encodings():
    model = Transformer(_cfg(pos_encoding="alibi"))
    shard_alibi_slopes(model, 2, 1)
    assert model.blocks[0].attn.alibi_slopes.tolist() == [2.0**-6, 2.0**-8]  # heads 2, 3 of 2^-2, 2^-4, 2^-6, 2^-8
    assert "alibi_slopes" not in model.state_dict() and "blocks.0.attn.alibi_slopes" not in model.state_dict()
    with pytest.raises(ValueError, match="already sharded"):
        shard_alibi_slopes(model, 2, 1)
    rope = Transformer(_cfg(pos_encoding="rope"))
    assert shard_alibi_slopes(rope, 2, 0).blocks[0].attn.alibi_slopes is None


def test_block_wrappers_keep_pipeline_block_names():
    """A pipeline-split model keeps its blocks in a ModuleDict under their original indices; activation checkpointing
    wraps them in place and the state-dict keys stay those of the unsplit model."""
    import copy

    from torch import nn

    from lightning_llm.config import TransformerConfig
    from lightning_llm.nn.transformer import Transformer
    from lightning_llm.parallel import apply_activation_checkpointing

    full = Transformer(TransformerConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16))
    split = copy.deepcopy(full)
    split.blocks = nn.ModuleDict({"2": split.blocks[2], "3": split.blocks[3]})
    apply_activation_checkpointing(split)
    assert type(split.blocks["2"]).__name__ == "CheckpointWrapper"
    keys = {k for k in split.state_dict() if k.startswith("blocks.")}
    assert keys == {k for k in full.state_dict() if k.startswith(("blocks.2.", "blocks.3."))}
