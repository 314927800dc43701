"""Every checkpoint our modules really write loads with ``weights_only=True``, through our loaders and Lightning's resume.

Each module (CausalLM, RewardModel, DPO, PPO) is fitted for one step by a real Trainer with ``AtomicCheckpointIO``;
its checkpoint must need no global beyond :data:`lightning_llm.checkpoint.SAFE_GLOBALS` (checked with the allow-list
emptied), load with :func:`load_checkpoint` and :func:`load_pretrained` (same weights as the module), and resume with
``Trainer.fit(ckpt_path=...)`` without our plugin (torch's own ``weights_only=True`` default).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llm.checkpoint import SAFE_GLOBALS, AtomicCheckpointIO, load_checkpoint
from lightning_llm.config import TransformerConfig


def _cases():
    from lightning_llm.data import TextDataModule
    from lightning_llm.data.preference import PreferenceDataModule
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.modules.dpo import DPO
    from lightning_llm.modules.ppo import PPO
    from lightning_llm.modules.reward_model import RewardModel

    def config(vocab_size: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)

    def preference() -> PreferenceDataModule:
        return PreferenceDataModule(num_train=16, num_val=4, max_length=32, max_prompt_length=16, batch_size=4)

    return {
        "CausalLM": (
            lambda: CausalLM(config=config(300)),
            lambda: TextDataModule("embedded", vocab_size=300, block_size=32, batch_size=4, max_train_blocks=8),
            "model.",
        ),
        "RewardModel": (lambda: RewardModel(config=config(64)), preference, "backbone."),
        "DPO": (lambda: DPO(config=config(64)), preference, "policy."),
        "PPO": (
            lambda: PPO(config=config(64), reward_functions=[TargetCharReward(target="a", length=4)], max_new_tokens=4),
            lambda: PromptDataModule(num_train=8, num_val=4, batch_size=4),
            "policy.",
        ),
    }


def _trainer(root, max_steps: int, plugins=None, callbacks=None) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        plugins=plugins,
        callbacks=callbacks,
    )


@pytest.mark.parametrize("name", ["CausalLM", "RewardModel", "DPO", "PPO"])
def test_module_checkpoint_loads_safely_everywhere(name, tmp_path):
    make_module, make_data, prefix = _cases()[name]
    L.seed_everything(0, verbose=False)
    module = make_module()
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(tmp_path, 1, plugins=[AtomicCheckpointIO()], callbacks=[saver]).fit(module, datamodule=make_data())
    path = tmp_path / "last.ckpt"

    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:  # what the file needs beyond torch's own weights-only types
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    finally:
        torch.serialization.add_safe_globals(registered)
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    assert needed <= allowed, f"{name} checkpoints need globals outside SAFE_GLOBALS: {sorted(needed - allowed)}"

    checkpoint = load_checkpoint(path)
    assert checkpoint["global_step"] >= 1 and isinstance(checkpoint["transformer_config"], dict)

    from lightning_llm.loading import load_pretrained

    model, tokenizer = load_pretrained(path)
    ours = {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    theirs = model.state_dict()
    for key, value in ours.items():
        if key in theirs:
            assert torch.equal(theirs[key], value), key
    assert tokenizer is not None and tokenizer.vocab_size <= model.config.vocab_size

    L.seed_everything(0, verbose=False)
    resumed = _trainer(tmp_path / "resume", checkpoint["global_step"] + 1)  # no plugin: Lightning's own torch.load
    resumed.fit(make_module(), datamodule=make_data(), ckpt_path=str(path))
    assert resumed.global_step > checkpoint["global_step"]
