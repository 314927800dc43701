"""``compile`` on every module: the compiled run trains to the same weights as the eager one.

Each module is fitted for 2 optimizer steps twice from the same seed, eagerly and with ``compile`` (dynamo traces
our Transformer's forward, AOTAutograd its backward; the ``aot_eager`` backend runs the traced graphs with the eager
kernels, so the two runs agree to float32 rounding). The fast default runs every module; inductor's generated
kernels (``compile: true``) are checked on CausalLM under the ``slow`` marker (a C++ compile on CPU takes a minute).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_llm.config import TransformerConfig


def _config(vocab_size: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)


def _case(name: str):
    """``(module factory(**compile), datamodule factory)`` of a tiny ``name``."""
    from lightning_llm.data import TextDataModule
    from lightning_llm.data.preference import PreferenceDataModule
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.sft import SFTDataModule
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules import DPO, GRPO, PPO, SFT, CausalLM, RewardModel

    def preference():
        return PreferenceDataModule(num_train=8, num_val=4, max_length=32, max_prompt_length=16, batch_size=4)

    def prompts():
        return PromptDataModule(num_train=8, num_val=4, batch_size=2)

    reward = [TargetCharReward(target="a", length=4)]
    return {
        "CausalLM": (
            lambda **kw: CausalLM(config=_config(300), **kw),
            lambda: TextDataModule("embedded", vocab_size=300, block_size=32, batch_size=4, max_train_blocks=8),
        ),
        "SFT": (
            lambda **kw: SFT(config=_config(64), **kw),
            lambda: SFTDataModule(num_train=8, num_val=4, max_length=32, batch_size=4),
        ),
        "RewardModel": (lambda **kw: RewardModel(config=_config(64), **kw), preference),
        "DPO": (lambda **kw: DPO(config=_config(64), **kw), preference),
        "PPO": (lambda **kw: PPO(config=_config(64), reward_functions=reward, max_new_tokens=4, **kw), prompts),
        "GRPO": (
            lambda **kw: GRPO(config=_config(64), reward_functions=reward, num_generations=2, max_new_tokens=4, **kw),
            prompts,
        ),
    }[name]


def _fit(name: str, tmp_path, **compile) -> tuple[dict[str, torch.Tensor], L.LightningModule]:
    make_module, make_data = _case(name)
    L.seed_everything(0, verbose=False)
    module = make_module(**compile)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step >= 2  # PPO counts its policy and value optimizer steps
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, module


@pytest.mark.parametrize("name", ["CausalLM", "SFT", "RewardModel", "DPO", "PPO", "GRPO"])
def test_compiled_module_trains_like_eager(name, tmp_path):
    torch._dynamo.reset()
    eager, _ = _fit(name, tmp_path / "eager")
    compiled, module = _fit(name, tmp_path / "compiled", compile={"backend": "aot_eager"})
    models = list(module._models())
    assert models and all(m._compiled_call_impl is not None for m in models), "the transformers were not compiled"
    assert eager.keys() == compiled.keys()
    start = _fit_start(name)
    assert any(not torch.equal(eager[k], start[k]) for k in start), "training changed no weight: a vacuous check"
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def _fit_start(name: str) -> dict[str, torch.Tensor]:
    """The weights a run starts from (same seed as :func:`_fit`)."""
    make_module, make_data = _case(name)
    L.seed_everything(0, verbose=False)
    module = make_module()
    module.configure_model()
    return module.state_dict()


def test_compile_must_be_bool_or_dict():
    from lightning_llm.modules import CausalLM

    with pytest.raises(TypeError, match="`compile` must be true/false or a dict"):
        CausalLM(config=_config(64), compile="yes")


@pytest.mark.slow
def test_inductor_compiled_causal_lm_trains_like_eager(tmp_path):
    torch._dynamo.reset()
    eager, _ = _fit("CausalLM", tmp_path / "eager")
    compiled, _ = _fit("CausalLM", tmp_path / "compiled", compile=True)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
