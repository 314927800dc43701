"""``FinalCheckpoint``: a fit that ends past its last validation still leaves its final weights on disk (Lightning's
default ``ModelCheckpoint`` alone does not: the reference below shows the gap), resumable; no duplicate save when
the last step was saved; no action for ``save_last`` or monitored callbacks. The CLI path (the installed executable)
is in ``tests/test_console_script.py``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llm.callbacks import FinalCheckpoint
from lightning_llm.checkpoint import load_checkpoint
from lightning_llm.config import TransformerConfig
from lightning_llm.modules.causal_lm import CausalLM

CFG = dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)


def _loader() -> torch.utils.data.DataLoader:
    ids = torch.randint(0, 32, (40, 9), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row[:-1], "targets": row[1:]} for row in ids]
    return torch.utils.data.DataLoader(data, batch_size=4)  # 10 steps an epoch


def _fit(make_trainer, root, callbacks: list, steps: int, ckpt_path=None) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(**CFG), learning_rate=1e-2, warmup_steps=0)
    trainer = make_trainer(
        callbacks,
        default_root_dir=root,
        steps=steps,
        enable_checkpointing=True,
        val_check_interval=2,  # validations (and the default checkpoint) at steps 2, 4, ...
        check_val_every_n_epoch=None,
        limit_val_batches=1,
    )
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader(), ckpt_path=ckpt_path)
    return model


def _steps(tmp_path) -> dict[str, int]:
    return {p.name: load_checkpoint(p)["global_step"] for p in tmp_path.rglob("*.ckpt")}


def test_lightning_alone_loses_the_steps_after_the_last_validation(make_trainer, tmp_path) -> None:
    """The gap this callback closes: 3 steps, a validation at step 2, no checkpoint of step 3."""
    _fit(make_trainer, tmp_path, [], steps=3)
    assert _steps(tmp_path) == {"epoch=0-step=2.ckpt": 2}


def test_the_final_weights_are_saved_and_resume(make_trainer, tmp_path) -> None:
    model = _fit(make_trainer, tmp_path, [FinalCheckpoint()], steps=3)
    # Lightning's default keeps only its newest top-k file; the step-3 file is written beside it, named by the same
    # template (its epoch is the trainer's count when fit ends: Lightning has closed the epoch by then)
    steps = _steps(tmp_path)
    assert sorted(steps.values()) == [2, 3] and steps["epoch=0-step=2.ckpt"] == 2
    (final,) = tmp_path.rglob("epoch=*-step=3.ckpt")
    state = load_checkpoint(final)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name
    # resumable: a longer run starts from it (Lightning closed the epoch when max_steps ended it, so it goes on at
    # the next epoch, as from its own save_last checkpoint written at the end of training)
    seen = []

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.append((trainer.global_step, pl_module.model.wte.weight.detach().clone()))

    resumed_dir = tmp_path / "resumed"
    _fit(make_trainer, resumed_dir, [FirstWeights(), FinalCheckpoint()], steps=5, ckpt_path=final)
    assert seen[0][0] == 3 and torch.equal(seen[0][1], model.model.wte.weight)
    assert 5 in _steps(resumed_dir).values()


def test_no_second_save_when_the_last_step_was_saved(make_trainer, tmp_path) -> None:
    final = FinalCheckpoint()
    _fit(make_trainer, tmp_path, [final], steps=4)
    assert _steps(tmp_path) == {"epoch=0-step=4.ckpt": 4}  # saved once, by the validation at step 4
    assert final.saved_step == 4


@pytest.mark.parametrize(
    "checkpoint", [ModelCheckpoint(save_last=True, save_top_k=0), ModelCheckpoint(monitor="val/loss")]
)
def test_save_last_and_monitored_callbacks_are_left_alone(make_trainer, tmp_path, checkpoint) -> None:
    _fit(make_trainer, tmp_path, [checkpoint, FinalCheckpoint()], steps=3)
    names = set(_steps(tmp_path))
    assert not any(
        "step=3" in name for name in names
    )  # save_last wrote last.ckpt itself; a monitored one keeps its best
    assert names == ({"last.ckpt"} if checkpoint.save_last else {"epoch=0-step=2.ckpt"})
