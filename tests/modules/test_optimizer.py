"""The default optimiser of every module (``LLMModule.make_optimizer``): torch's fused AdamW where it exists for the
parameters, the same update as the unfused one, and a fallback where it does not."""

from __future__ import annotations

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.modules.base import fused_adamw_supported
from lightning_llm.modules.causal_lm import CausalLM
from lightning_llm.modules.dpo import DPO
from lightning_llm.modules.reward_model import RewardModel
from lightning_llm.modules.sft import SFT

CFG = TransformerConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2])


def _optimizer(module):
    module.configure_model()
    return module.configure_optimizers()["optimizer"]


@pytest.mark.skipif(TORCH < (2, 4), reason="torch's fused AdamW runs on CPU from 2.4")
@pytest.mark.parametrize("cls", [CausalLM, SFT, RewardModel, DPO])
def test_every_module_gets_the_fused_adamw(cls):
    opt = _optimizer(cls(config=CFG))
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert not opt.defaults.get("foreach")


@pytest.mark.skipif(TORCH < (2, 4), reason="torch's fused AdamW runs on CPU from 2.4")
def test_fused_step_equals_the_unfused_step():
    """Three steps of the fused optimiser against torch's default (foreach) AdamW from the same weights and
    gradients: the same parameters to 1e-6 (weight decay on matrices, betas, lr as configured)."""
    torch.manual_seed(0)
    module = CausalLM(config=CFG, learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    fused = _optimizer(module)
    params = [p for g in fused.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(3):
        fused.zero_grad()
        module.loss({"input_ids": ids, "targets": ids.roll(-1, 1)}).backward()
        grads.append([p.grad.clone() for p in params])
        fused.step()
    after_fused = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    # the same groups; lr as the scheduler set it (warmup's first step: 1e-2 / 100)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": g["lr"]} for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, betas=(0.9, 0.99), fused=False)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.1, 0.0] and plain.param_groups[0]["lr"] == 1e-4
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        plain.step()
    for a, b in zip(after_fused, params, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(a, s) for a, s in zip(after_fused, start, strict=True))  # the steps moved something


def test_fallback_where_fused_is_unavailable(monkeypatch):
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.int64)])  # not floating point
    assert not fused_adamw_supported([torch.zeros(2, device="meta")])  # no kernel for the device
    assert not fused_adamw_supported([])
    real = torch.optim.AdamW

    def refuse_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", refuse_fused)
    opt = _optimizer(CausalLM(config=CFG))
    assert type(opt) is real and not opt.defaults.get("fused")


def test_an_optimizer_callable_is_used_as_given():
    module = CausalLM(config=CFG, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert type(_optimizer(module)) is torch.optim.SGD
