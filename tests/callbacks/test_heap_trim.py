"""``CPUHeapTrim``: trims at every block boundary (counted), training unchanged bit for bit, hooks removed after fit,
clear errors and warnings. Its memory effect is measured by ``benchmarks/sft.py`` (not here: resident memory depends
on the machine and would make a flaky test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_llm.callbacks import CPUHeapTrim
from lightning_llm.callbacks.heap_trim import glibc_malloc_trim
from lightning_llm.config import TransformerConfig
from lightning_llm.modules.causal_lm import CausalLM

pytestmark = pytest.mark.skipif(glibc_malloc_trim() is None, reason="needs glibc's malloc_trim")

CFG = dict(vocab_size=48, block_size=16, n_layer=3, n_head=2, n_embd=16)


def _fit(make_trainer, callbacks: list, steps: int = 3) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(**CFG), learning_rate=1e-2, warmup_steps=0)
    ids = torch.randint(0, 48, (steps * 4, 17), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row[:-1], "targets": row[1:]} for row in ids]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    make_trainer(callbacks, steps=steps, limit_val_batches=0).fit(model, train_dataloaders=loader)
    return model


def test_trims_at_every_block_boundary_and_training_is_unchanged(make_trainer) -> None:
    trim = CPUHeapTrim()
    trimmed = _fit(make_trainer, [trim])
    plain = _fit(make_trainer, [])
    n_layer, steps = CFG["n_layer"], 3
    # per step: before each block's forward, when the gradient reaches each block's output, and before the backward
    assert trim.trims == steps * (2 * n_layer + 1)
    for (name, a), (_, b) in zip(trimmed.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for block in trimmed.model.blocks:  # the hooks are gone after fit
        assert not block._forward_pre_hooks and not block._forward_hooks


def test_block_types_select_the_modules(make_trainer) -> None:
    trim = CPUHeapTrim(block_types=["MLP"])  # one MLP per block: the same count
    _fit(make_trainer, [trim], steps=2)
    assert trim.trims == 2 * (2 * CFG["n_layer"] + 1)
    none = CPUHeapTrim(block_types=["NoSuchLayer"])
    with pytest.warns(UserWarning, match="found no blocks"):
        _fit(make_trainer, [none], steps=2)
    assert none.trims == 2  # only before each backward


@pytest.mark.parametrize("bad", ["Block", [1, 2]])
def test_bad_block_types_is_a_clear_error(bad) -> None:
    with pytest.raises(TypeError, match="`block_types` must be a list of class names"):
        CPUHeapTrim(block_types=bad)


def test_the_preset_stacks_onto_a_fit(tmp_path) -> None:
    """``--config callbacks/heap_trim`` appends the callback to a packaged preset's (the SFT quickstart's)."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "lightning_llm", "fit", "--config", "sft/sft_quickstart", "--config",
           "callbacks/heap_trim", "--print_config"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lightning_llm.callbacks.CPUHeapTrim" in proc.stdout
