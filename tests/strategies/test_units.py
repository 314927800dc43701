"""In-process tests of the strategy helpers: parallelize on a 1-rank mesh, the planner, clipping, resumable loading, atomic saves."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from lightning_llm.checkpoint import AtomicCheckpointIO, ResumableDataLoader
from lightning_llm.config import TransformerConfig
from lightning_llm.nn.transformer import Transformer
from lightning_llm.strategies import (
    BlockFSDPStrategy,
    FSDP2Strategy,
    _replace_dir,
    activation_bytes,
    apply_tensor_parallel,
    clip_grad_norm_,
    ddp,
    fsdp,
    fsdp2,
    parallelize,
    plan,
)


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


# ---------------------------------------------------------------------------------------------------- presets
def test_strategy_factories():
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_llm.nn.transformer import Block

    assert isinstance(ddp(), DDPStrategy)
    s = fsdp("SHARD_GRAD_OP", state_dict_type="sharded")
    assert isinstance(s, BlockFSDPStrategy) and s._state_dict_type == "sharded"
    assert s.kwargs["auto_wrap_policy"].__class__.__name__ == "ModuleWrapPolicy" or Block in str(s.kwargs)
    assert s._activation_checkpointing_kwargs  # activation checkpointing policy {Block}
    s2 = fsdp2(tensor_parallel_size=2, activation_checkpointing=True, mp_policy={"param_dtype": "bfloat16"})
    assert isinstance(s2, FSDP2Strategy) and s2._tensor_parallel_size == 2
    assert s2.parallelize_kwargs["activation_checkpointing"] is True
    with pytest.raises(ValueError, match="sharding_strategy"):
        fsdp("ZERO3")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        fsdp2(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="mp_policy"):
        fsdp2(mp_policy={"param_dtype": "bfloat17"})


# ---------------------------------------------------------------------------------------------------- planner
def test_plan_hand_derived():
    cfg = TransformerConfig(
        vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, mlp="gelu", norm="layernorm"
    )
    # P by hand: wte 1000*64 + head 1000*64 = 128000; per block attention 4*64*64 = 16384, MLP 2*64*256 = 32768,
    # two LayerNorms 2*2*64 = 256 -> 49408; two blocks 98816; final LayerNorm 128 -> P = 226944
    p = 226944
    assert sum(t.numel() for t in Transformer(cfg).parameters()) == p
    res = plan(cfg, world_size=4, precision="32-true", micro_batch_size=2, seq_len=64, activation_checkpointing=False)
    rows = {r["strategy"]: r for r in res["rows"]}
    ddp_row, fs = rows["DDP"], rows["FSDP FULL_SHARD"]
    assert (ddp_row["params_bytes"], ddp_row["grads_bytes"], ddp_row["optimizer_bytes"]) == (4 * p, 4 * p, 8 * p)
    assert fs["sharded_params_bytes"] == 4 * p // 4 and fs["grads_bytes"] == p and fs["optimizer_bytes"] == 2 * p
    assert fs["gathered_bytes"] == 2 * 4 * 49408  # two unsharded fp32 blocks
    # FSDP2+TP d=2, t=2: blocks split 4 ways, the rest (wte, head, final norm = 128128) 2 ways
    tp = rows["FSDP2+TP (d=2, t=2)"]
    assert tp["optimizer_bytes"] == 8 * (98816 / 4 + 128128 / 2)
    # bf16-mixed: fp32 masters + 2 fp32 AdamW states, same 16 bytes/parameter for DDP as 32-true
    mixed = {r["strategy"]: r for r in plan(cfg, 4, "bf16-mixed", activation_checkpointing=False)["rows"]}
    assert mixed["DDP"]["params_bytes"] + mixed["DDP"]["grads_bytes"] + mixed["DDP"]["optimizer_bytes"] == 16 * p


def test_activation_formula_korthikanti():
    cfg = TransformerConfig(vocab_size=1000, block_size=64, n_layer=3, n_head=4, n_embd=64)
    s, b, h, a = 64, 2, 64, 4
    head = 4 * b * s * 1000 + 2 * 2 * s * b * h
    # Korthikanti et al. eq. (2): sbh(34 + 5as/h) per layer in 16-bit; a fused kernel stores no attention matrix
    assert activation_bytes(cfg, b, s, 2, fused_attention=False) == int(3 * s * b * h * (34 + 5 * a * s / h) + head)
    assert activation_bytes(cfg, b, s, 2) == int(3 * s * b * h * 34 + head)
    # tensor parallel t=2: sbh(10 + 24/t) = 22 sbh; full recomputation keeps 2sbh per layer + one layer in flight
    assert activation_bytes(cfg, b, s, 2, tensor_parallel_size=2) == int(3 * s * b * h * 22 + head)
    assert activation_bytes(cfg, b, s, 2, activation_checkpointing=True) == int(
        3 * 2 * s * b * h + 34 * s * b * h + head
    )


def test_plan_recommendation_and_cli(capsys, tmp_path):
    cfg = TransformerConfig(vocab_size=32000, block_size=2048, n_layer=24, n_head=16, n_embd=2048)
    res = plan(cfg, world_size=8, micro_batch_size=4, device_memory_gb=16)
    fitting = [r for r in res["rows"] if r["fits"]]
    assert res["recommendation"] == fitting[0]
    assert not res["rows"][0]["fits"]  # DDP of a 1.3B model (21 GB of states) does not fit in 16 GB
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  init_args:\n    config:\n      n_layer: 2\n      n_embd: 64\n      n_head: 4\n")
    from lightning_llm.strategies import main

    assert main(["plan", "--config", str(path), "--world-size", "2", "--device-memory-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "FSDP FULL_SHARD" in out and "recommended: DDP" in out
    with pytest.raises(ValueError, match="precision"):
        plan(cfg, 2, precision="fp8")


# ---------------------------------------------------------------------------------------------------- resume & saves
def _batches(loader, n=None):
    it = iter(loader)
    out = []
    while n is None or len(out) < n:
        try:
            out.append(next(it)[0].tolist())
        except StopIteration:
            break
    return out


@pytest.mark.parametrize("stop_epoch,stop_at", [(0, 2), (1, 3), (1, 5)])
def test_resumable_loader_continues_exactly(stop_epoch, stop_at):
    ds = TensorDataset(torch.arange(20))

    def make():
        return ResumableDataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))

    ref = make()
    epochs = [_batches(ref) for _ in range(4)]  # the uninterrupted run: 4 epochs of 5 batches
    run = make()
    for _ in range(stop_epoch):
        _batches(run)
    _batches(run, stop_at)
    state = run.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = _batches(resumed)
    if stop_at < 5:
        assert rest == epochs[stop_epoch][stop_at:]
    else:  # saved on the last batch of the epoch: the next iteration is the next epoch
        assert rest == epochs[stop_epoch + 1]
    assert _batches(resumed) == epochs[stop_epoch + 1 + (stop_at >= 5)]


def test_atomic_checkpoint_io_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def exploding_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(RuntimeError, match="killed"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_sharded_save_replaces_folder_whole(tmp_path, monkeypatch):
    dst = tmp_path / "last.ckpt"
    dst.mkdir()
    (dst / "shard").write_text("old")
    src = tmp_path / ".new"
    src.mkdir()
    (src / "shard").write_text("new")
    calls = []
    real = os.replace

    def crash_second(a, b):  # the old folder was moved aside, then the process dies before the new one is in place
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(KeyboardInterrupt):
        _replace_dir(src, dst)
    monkeypatch.undo()
    aside = calls[0][1]
    assert (aside / "shard").read_text() == "old"  # the previous checkpoint survives, complete
    _replace_dir(src, dst)
    assert (dst / "shard").read_text() == "new" and not src.exists()
