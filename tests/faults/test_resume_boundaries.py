"""Resume at every boundary with the real Trainer: the reference is an uninterrupted run, never a model of the loader.

An uninterrupted ``Trainer.fit`` records, for every optimizer step, the exact loss and the sample indices of its batch
(:class:`StepRecorder`) and writes a checkpoint after every step. A fresh Trainer resumed from the checkpoint of step
``k`` must then record exactly the steps ``k+1..max_steps`` of the reference (same indices, bit-identical losses) and
end with bit-identical weights. ``k`` covers mid-epoch, the last batch of an epoch, the first batch of the next epoch,
and the last batch of the second epoch, for a training set that is a multiple of the batch size (192 / 8: the case
that used to replay a different permutation) and one that is not (190 / 8: a short last batch).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from _faults_helpers import StepRecorder, ToyData, ToyRegression  # noqa: E402

BATCH = 8
MAX_STEPS = 52  # 24 batches per epoch (192 / 8 and ceil(190 / 8)): two epochs and the start of a third


def _trainer(root: Path, callbacks: list, max_steps: int = MAX_STEPS) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=10,  # validation mid-epoch too; a restart must not replay or skip training batches for it
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=callbacks,
        deterministic=True,
    )


def _fit(root: Path, n: int, ckpt_path: str | None = None, save: bool = False):
    L.seed_everything(0, verbose=False)
    recorder = StepRecorder()
    callbacks: list = [recorder]
    if save:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        )
    model = ToyRegression()
    _trainer(root, callbacks).fit(model, datamodule=ToyData(n, BATCH), ckpt_path=ckpt_path)
    return recorder.records, model


@pytest.fixture(scope="module", params=[192, 190], ids=["multiple-of-batch", "short-last-batch"])
def reference(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ref{request.param}")
    records, model = _fit(root, request.param, save=True)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    return request.param, root, records, model


@pytest.mark.parametrize(
    "stop",
    [10, 24, 25, 48],
    ids=["mid-epoch", "last-batch-of-epoch", "first-batch-of-next-epoch", "last-batch-of-second-epoch"],
)
def test_resume_from_any_step_replays_the_uninterrupted_run(reference, stop, tmp_path):
    n, root, ref_records, ref_model = reference
    per_epoch = -(-n // BATCH)
    # the uninterrupted run itself: every epoch is one permutation of the n samples, each seen once
    for epoch in range(MAX_STEPS // per_epoch):
        seen = [i for r in ref_records[epoch * per_epoch : (epoch + 1) * per_epoch] for i in r["batch"]]
        assert sorted(seen) == list(range(n))
    assert ref_records[:per_epoch] != ref_records[per_epoch : 2 * per_epoch]  # and the epochs are reshuffled

    ckpt = root / "ckpt" / f"step={stop}.ckpt"
    records, model = _fit(tmp_path, n, ckpt_path=str(ckpt))
    expected = ref_records[stop:]
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for got, want in zip(records, expected):
        assert got["batch"] == want["batch"], f"step {want['step']}: resumed run trained on other samples"
        assert got["loss"] == want["loss"], f"step {want['step']}: loss {got['loss']} != {want['loss']}"
    for (name, got), want in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(got, want), name
