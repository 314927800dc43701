"""Exact mid-epoch resume of ResumableDataLoader and atomic single-file saves (AtomicCheckpointIO)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_llm.checkpoint import AtomicCheckpointIO, ResumableDataLoader


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
