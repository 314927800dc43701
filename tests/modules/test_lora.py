"""LoRA through ``peft`` on every module: the formula, merge, errors, adapter-only checkpoints, the reference model
without a copy, export that ``peft.PeftModel.from_pretrained`` loads, gradient checkpointing and dtypes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_llama import save_tiny_llama  # noqa: E402

from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.nn.lora import adapters_disabled, apply_lora, lora_layers, merge_lora  # noqa: E402
from lightning_llm.nn.transformer import Transformer  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = TransformerConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)


def _randomise_b(model: torch.nn.Module) -> None:
    """B starts at zero (LoRA's init): give it values so adapters change the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model):
            w = layer.lora_B["default"].weight
            w.copy_(0.1 * torch.randn(w.shape, generator=gen))


def build_tiny_hf_llama(directory, vocab_texts=None) -> tuple[str, object]:
    """``save_pretrained`` of a random tiny ``LlamaForCausalLM`` with a BPE tokenizer trained here (offline)."""
    from lightning_llm.data.sft import instruction_examples

    texts = vocab_texts or [
        f"user: {e['prompt'][0]['content']}\nassistant: {e['completion'][0]['content']}\n"
        for e in instruction_examples(400, 0)
    ]
    return str(directory), save_tiny_llama(directory, texts, vocab_size=300, hidden=32)


# ------------------------------------------------------------------------------------------------ the adapters
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_layer_is_the_formula(rslora):
    model = Transformer(CFG)
    w = model.blocks[0].attn.q_proj.weight.detach().clone()
    apply_lora(model, {"r": 4, "alpha": 16, "target_modules": ["q_proj"], "use_rslora": rslora})
    _randomise_b(model)
    layer = model.blocks[0].attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 32)
    scale = 16 / math.sqrt(4) if rslora else 16 / 4  # REFERENCES.md: alpha / r, rsLoRA alpha / sqrt(r)
    expected = x @ w.T + scale * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_merge_equals_unmerged_and_disable_gives_base():
    model = Transformer(CFG).eval()
    ids = torch.randint(0, 64, (2, 12))
    base = model(ids)
    apply_lora(model, {"r": 4, "alpha": 8, "target_modules": "all-linear"})
    _randomise_b(model)
    adapted = model(ids)
    assert (adapted - base).abs().max() > 1e-2
    with adapters_disabled(model):
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    assert all(p.requires_grad for layer in lora_layers(model) for p in layer.lora_A.parameters())
    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(Transformer(CFG).state_dict())
    torch.testing.assert_close(model(ids), adapted, rtol=0, atol=1e-5)


def test_lean_layer_matches_peft_forward_and_gradients():
    """The in-place adapter sum is peft's ``W x + s B A x`` (values and gradients of x, A and B); disabled adapters,
    a second active adapter or pickling / deepcopy fall back to or keep peft's behaviour."""
    import copy
    import pickle

    from peft.tuners.lora.layer import Linear as PeftLinear

    from lightning_llm.nn.lora import LeanLoraLinear

    model = Transformer(CFG)
    apply_lora(model, {"r": 4, "alpha": 8, "target_modules": "all-linear"})
    _randomise_b(model)
    layers = lora_layers(model)
    assert layers and all(type(layer) is LeanLoraLinear for layer in layers)
    layer = model.blocks[0].mlp.up_proj
    x = torch.randn(2, 5, 32, requires_grad=True)

    def run(forward):
        out = forward(x)
        out.pow(2).sum().backward()
        grads = [
            x.grad.clone(),
            layer.lora_A["default"].weight.grad.clone(),
            layer.lora_B["default"].weight.grad.clone(),
        ]
        x.grad = layer.lora_A["default"].weight.grad = layer.lora_B["default"].weight.grad = None
        return out.detach(), grads

    lean_out, lean_grads = run(layer)
    peft_out, peft_grads = run(lambda t: PeftLinear.forward(layer, t))
    torch.testing.assert_close(lean_out, peft_out, rtol=1e-6, atol=1e-6)
    for a, b in zip(lean_grads, peft_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), adapters_disabled(model):
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    ids = torch.randint(0, 64, (2, 8))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.blocks[0].attn.q_proj) is LeanLoraLinear
        torch.testing.assert_close(clone(ids), model(ids), rtol=0, atol=0)


def test_lora_on_the_transformer_output_layer_is_refused():
    """Our Transformer projects with ``output_weight`` (never calling ``lm_head``): an adapter there would be ignored."""
    with pytest.raises(ValueError, match="includes 'lm_head'"):
        apply_lora(Transformer(CFG), {"r": 2, "target_modules": ["q_proj", "lm_head"]})


def test_lora_errors():
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer.*'q_proj'"):
        apply_lora(Transformer(CFG), {"target_modules": ["q_proj", "qproj"]})
    with pytest.raises(ValueError, match=r"`lora.r`=64 is larger than the layer .*min\(in, out\)=32"):
        apply_lora(Transformer(CFG), {"r": 64, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="unknown keys"):
        apply_lora(Transformer(CFG), {"rnk": 4})
    with pytest.raises(ValueError, match="positive integer"):
        apply_lora(Transformer(CFG), {"r": 0})
    from lightning_llm.modules.causal_lm import CausalLM

    with pytest.raises(ValueError, match="unknown keys"):  # checked at construction, before any loading
        CausalLM(config=CFG, lora={"rank": 2, "alpah": 4})


# ------------------------------------------------------------------------------------------------ modules
def test_every_module_takes_lora(tmp_path):
    from lightning_llm.modules import DPO, PPO, RewardModel
    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.modules.sft import SFT

    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    from lightning_llm.data.synthetic import TargetCharReward

    for cls in (CausalLM, SFT, RewardModel, DPO, PPO):
        extra = {"reward_functions": [TargetCharReward()]} if cls is PPO else {}
        module = cls(config=CFG, lora=lora, **extra)
        module.configure_model()
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        assert names and all(".lora_" in n or n.startswith(("head.", "value_head.")) for n in names), (cls, names)
    dpo = DPO(config=CFG, lora=lora)
    assert not any(n.startswith("ref.") for n, _ in dpo.named_parameters())  # no second copy


def test_reference_is_base_without_copy_and_memory_saved():
    from lightning_llm.modules import DPO

    full = DPO(config=CFG)
    lora = DPO(config=CFG, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    ids = torch.randint(0, 64, (2, 10))
    _randomise_b(lora.policy)
    with torch.no_grad(), adapters_disabled(lora.policy):
        base = lora.policy(ids)
    torch.testing.assert_close(lora.ref(ids), base, rtol=0, atol=0)
    assert (lora.policy(ids) - base).abs().max() > 1e-3  # the policy itself still has its adapters on
    assert lora.policy.blocks[0].attn.q_proj.lora_A["default"].weight.requires_grad  # restored after the ref call

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    saved = nbytes(full) - nbytes(lora)
    adapters = sum(p.numel() * p.element_size() for p in lora.parameters() if p.requires_grad)
    assert saved == nbytes(full.ref) - adapters  # the reference copy is gone; only the adapters were added


def _fit_sft(pretrained, tmp_path, lora, steps=3, **kwargs):
    from lightning_llm.data.sft import SFTDataModule
    from lightning_llm.modules.sft import SFT

    L.seed_everything(0)
    dm = SFTDataModule(tokenizer=pretrained, num_train=32, num_val=8, max_length=64, batch_size=4)
    module = SFT(pretrained=pretrained, lora=lora, learning_rate=1e-2, baseline=False, **kwargs)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "sft.ckpt"
    trainer.save_checkpoint(path)
    return module, path, dm


def test_adapter_only_checkpoint_resume_and_export(tmp_path):
    from lightning_llm.checkpoint import load_checkpoint
    from lightning_llm.cli import export
    from lightning_llm.loading import load_pretrained

    hf_dir, _ = build_tiny_hf_llama(tmp_path / "base")
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]}
    module, path, dm = _fit_sft(hf_dir, tmp_path, lora)
    ckpt = load_checkpoint(path)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]
    n_adapters = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert sum(ckpt["state_dict"][k].numel() for k in keys) == n_adapters
    opt_state = ckpt["optimizer_states"][0]["state"]
    assert sum(s["exp_avg"].numel() for s in opt_state.values()) == n_adapters  # optimizer state: adapters only
    assert ckpt["lora"]["base"].endswith("base") and ckpt["lora"]["settings"]["r"] == 4

    ids = torch.randint(0, module.config.vocab_size, (2, 16))
    module.eval()
    with torch.no_grad():
        ours = module(ids)
    # load_model rebuilds base + adapters, merged: the same logits
    merged, tok = load_pretrained(path)
    assert tok is not None
    torch.testing.assert_close(merged(ids), ours, rtol=0, atol=1e-5)

    # resume: a fresh module restores the adapters from the adapter-only checkpoint
    from lightning_llm.modules.sft import SFT

    again = SFT.load_from_checkpoint(path)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours, rtol=0, atol=1e-6)

    # export: the base as a Hugging Face model + a peft adapter that PeftModel.from_pretrained loads
    out = tmp_path / "export"
    export(str(path), str(out))
    assert (out / "adapter" / "adapter_config.json").is_file()
    base = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=0, atol=1e-5)
    tok_hf = transformers.AutoTokenizer.from_pretrained(out)
    assert tok_hf.chat_template  # the export carries a chat template
    # --merge: one model with the adapters folded in
    export(str(path), str(tmp_path / "merged"), merge=True)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_merged(ids).logits, ours, rtol=0, atol=1e-5)


def test_gradient_checkpointing_same_loss_and_grads():
    from lightning_llm.modules.causal_lm import CausalLM

    torch.manual_seed(0)
    plain = CausalLM(config=CFG)
    plain.configure_model()
    ckpt = CausalLM(config=CFG, gradient_checkpointing=True)
    ckpt.configure_model()
    ckpt.model.load_state_dict(plain.model.state_dict())
    assert "CheckpointWrapper" in type(ckpt.model.blocks[0]).__name__
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1)}
    la, lb = plain.loss(batch), ckpt.loss(batch)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    ga = dict(plain.model.named_parameters())
    for name, p in ckpt.model.named_parameters():
        torch.testing.assert_close(p.grad, ga[name.replace("_checkpoint_wrapped_module.", "")].grad)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_hf_weights_load_in_the_dtype_asked(tmp_path, dtype):
    from lightning_llm.modules.sft import SFT

    hf_dir, _ = build_tiny_hf_llama(tmp_path / "base")
    module = SFT(pretrained=hf_dir, dtype=dtype, lora={"r": 2})
    module.configure_model()
    base = {p.dtype for n, p in module.model.named_parameters() if ".lora_" not in n}
    assert base == {getattr(torch, dtype)}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable", ["adapters", "adapters+x", "all"])
def test_lora_linear_function_matches_autograd_float64(bias: bool, trainable: str):
    """``_LoraLinearFunction`` (one ``addmm_`` forward, input gradient of both paths in one buffer) against autograd's
    derivative of ``x W^T + b + s (x A^T) B^T``, in float64, whichever inputs need gradients."""
    from lightning_llm.nn.lora import _LoraLinearFunction

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    a, bb = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    a.requires_grad_(), bb.requires_grad_()
    if trainable in ("adapters+x", "all"):
        x.requires_grad_()
    if trainable == "all":
        w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    scale = 0.75
    leaves = [t for t in (x, w, b, a, bb) if t is not None and t.requires_grad]
    out = _LoraLinearFunction.apply(x, w, b, a, bb, scale)
    ref = torch.nn.functional.linear(x, w, b) + scale * (x @ a.t()) @ bb.t()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(7, 6, generator=g, dtype=torch.float64)
    for got, exp in zip(
        torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(ref, leaves, grad_out), strict=True
    ):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: _LoraLinearFunction.apply(*t, scale), (x, w, b, a, bb))


def test_lean_layer_paths():
    """No dropout: the fused function (one saved input, its gradient in one buffer); with dropout: the in-place
    ``add_`` path, the same values as peft's forward under the same random mask."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    for dropout, fn in ((0.0, "_LoraLinearFunctionBackward"), (0.3, "AddBackward0")):
        torch.manual_seed(0)
        model = Transformer(CFG)
        apply_lora(model, {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": ["up_proj"]})
        _randomise_b(model)
        layer = model.blocks[0].mlp.up_proj
        x = torch.randn(2, 5, 32, requires_grad=True)
        out = layer(x)
        assert out.shape == (2, 5, layer.out_features)
        assert fn in type(out.grad_fn).__name__ or fn in type(out.grad_fn.next_functions[0][0]).__name__
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)
        torch.testing.assert_close(out, PeftLinear.forward(layer, x), rtol=1e-6, atol=1e-6)
