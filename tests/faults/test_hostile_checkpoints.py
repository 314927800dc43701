"""A checkpoint whose unpickling would run code is refused by every loader, and the code never runs.

Each hostile file carries an object whose ``__reduce__`` would create a marker file when unpickled with
``weights_only=False`` (checked below with plain ``torch.load``, so the payload is known to work). Every way into the
package that reads a checkpoint must refuse it with a ``ValueError`` saying so, and the marker must not exist.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_llm.checkpoint import AtomicCheckpointIO, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


class _SystemTouch:  # os.system("touch <marker>")
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _PathTouch:  # pathlib.Path(<marker>).touch()
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _checkpoint_like(payload) -> dict:
    """A dict shaped like our checkpoints, with the payload hidden among the hyper-parameters."""
    return {
        "epoch": 0,
        "global_step": 1,
        "state_dict": {"backbone.wte.weight": torch.zeros(4, 2), "head.weight": torch.zeros(1, 2)},
        "hyper_parameters": {"learning_rate": 1e-3, "note": payload},
        "transformer_config": {"vocab_size": 4, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 2},
    }


def _write(kind: str, path: Path, marker: Path) -> None:
    payload = {"system": _SystemTouch, "path_touch": _PathTouch}[kind.split("-")[0]](marker)
    if kind.endswith("-legacy"):  # a raw pickle, the format torch.save used before 1.6
        with open(path, "wb") as f:
            pickle.dump(_checkpoint_like(payload), f, protocol=2)
    else:
        torch.save(_checkpoint_like(payload), path)


KINDS = ["system", "path_touch", "system-legacy"]


@pytest.fixture(params=KINDS)
def hostile(request, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "hostile.ckpt"
    _write(request.param, path, marker)
    return path, marker


@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_is_real(tmp_path, kind):
    """Unpickled without the safeguard, each payload does create the file (so the other tests can fail)."""
    marker = tmp_path / "PWNED"
    _write(kind, tmp_path / "hostile.ckpt", marker)
    try:
        torch.load(tmp_path / "hostile.ckpt", weights_only=False)
    except RuntimeError:  # the raw pickle is not torch's legacy layout: the payload ran while reading its first record
        assert kind.endswith("-legacy")
    assert marker.exists()


def _load_pretrained(path: Path) -> None:
    from lightning_llm.loading import load_pretrained

    load_pretrained(path)


def _reward_from_checkpoint(path: Path) -> None:
    from lightning_llm.modules.reward_model import RewardModel

    RewardModel.from_checkpoint(str(path))


def _ppo_reward_model(path: Path) -> None:
    from lightning_llm.config import TransformerConfig
    from lightning_llm.modules.ppo import PPO

    config = TransformerConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    PPO(config=config, reward_model=str(path)).configure_model()


def _causal_lm_pretrained(path: Path) -> None:
    from lightning_llm.modules.causal_lm import CausalLM

    CausalLM(pretrained=str(path)).configure_model()  # what Trainer.fit calls: the backbone is built there


def _dpo_ref_model(path: Path) -> None:
    from lightning_llm.config import TransformerConfig
    from lightning_llm.modules.dpo import DPO

    config = TransformerConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    DPO(config=config, ref_model=str(path)).configure_model()


def _evaluation_resolve_model(path: Path) -> None:
    from lightning_llm.evaluation.lm import resolve_model

    resolve_model(str(path), device="cpu")


def _checkpoint_io(path: Path) -> None:
    AtomicCheckpointIO().load_checkpoint(path)


LOADERS: dict[str, Callable[[Path], None]] = {
    "load_checkpoint": load_checkpoint,
    "load_pretrained": _load_pretrained,
    "RewardModel.from_checkpoint": _reward_from_checkpoint,
    "PPO(reward_model=...)": _ppo_reward_model,
    "CausalLM(pretrained=...)": _causal_lm_pretrained,
    "DPO(ref_model=...)": _dpo_ref_model,
    "evaluation.resolve_model": _evaluation_resolve_model,
    "AtomicCheckpointIO.load_checkpoint": _checkpoint_io,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_hostile_checkpoint(hostile, loader):
    path, marker = hostile
    with pytest.raises(ValueError, match=r"Refusing to load checkpoint .*hostile\.ckpt.*could run code"):
        LOADERS[loader](path)
    assert not marker.exists()


def test_lightning_resume_without_our_plugin_refuses_it_too(hostile, tmp_path):
    """``Trainer.fit(ckpt_path=...)`` without AtomicCheckpointIO: torch >= 2.6 loads with weights_only=True."""
    path, marker = hostile

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(Tiny(), data, ckpt_path=str(path))
    assert not marker.exists()


def test_cli_validate_refuses_a_hostile_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "hostile.ckpt"
    _write("system", path, marker)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_llm", "validate", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    cmd += ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "16"]
    cmd += ["--model.init_args.config.n_head", "2", "--model.init_args.config.block_size", "16"]
    cmd += ["--data.init_args.vocab_size", "300", "--data.init_args.block_size", "16"]
    cmd += ["--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path)]
    cmd += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Refusing to load checkpoint" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert not marker.exists()


def test_a_planted_token_cache_file_is_never_unpickled(tmp_path):
    """The token-stream cache is read with load_checkpoint too: a hostile file there is rebuilt, not executed."""
    from lightning_llm.data.text import TextDataModule

    marker = tmp_path / "PWNED"
    dm = TextDataModule("embedded", vocab_size=300, block_size=32, cache_dir=str(tmp_path / "cache"))
    path = dm.stream_cache_path("val")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": _SystemTouch(marker)}, path)
    tokens = dm.token_stream("val")
    assert not marker.exists()
    clean = TextDataModule("embedded", tokenizer=dm.tokenizer, block_size=32, cache_dir=str(tmp_path / "clean"))
    assert torch.equal(tokens, clean.token_stream("val"))
    assert torch.equal(load_checkpoint(path)["tokens"], tokens)  # the planted file was replaced by the real cache
