"""Process groups are ended before the interpreter ends (``lightning_llm._dist``).

Why: a process that exits with a gloo group still initialised can abort with SIGABRT ("terminate called without an
active exception") while the interpreter is torn down; CI saw it once on rank 0 of a 2-process ``lightning-llm
evaluate`` under torchrun. Checked here: the ``lightning-llm`` program destroys a group its command created (also
when the command fails) and leaves one it found; HarnessLM, when it creates the group itself under torchrun,
registers its destruction with ``atexit``; our strategies' ``setup_environment`` does the same. The slow test runs
real 2-process gloo groups that exit right after a collective, the pattern that aborted, and requires every exit to
be clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_llm import _dist, cli

ROOT = Path(__file__).resolve().parents[1]


def _init_one_process_group(tmp_path: Path) -> None:
    """A real 1-process gloo group (a FileStore, no port needed)."""
    store = dist.FileStore(str(tmp_path / f"store{len(list(tmp_path.iterdir()))}"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


@pytest.fixture(autouse=True)
def _no_group_left():
    yield
    if dist.is_initialized():  # a failed test must not leave a group to the next one
        dist.destroy_process_group()


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_cli_destroys_the_group_its_command_created(outcome, tmp_path, monkeypatch, capsys):
    def command(argv):
        _init_one_process_group(tmp_path)
        assert dist.is_initialized()
        if outcome == "raises":
            raise RuntimeError("the command failed after the group was made")
        return 0

    monkeypatch.setattr(cli, "_lightning", command)  # what `lightning-llm fit` runs: the Trainer's stage
    assert cli.main(["fit"]) == (0 if outcome == "returns" else 1)
    assert not dist.is_initialized()
    if outcome == "raises":
        assert "the command failed" in capsys.readouterr().err


def test_cli_leaves_a_group_it_found(tmp_path, monkeypatch):
    _init_one_process_group(tmp_path)
    monkeypatch.setattr(cli, "_lightning", lambda argv: 0)
    assert cli.main(["fit"]) == 0
    assert dist.is_initialized()  # the caller's group: the caller ends it


def test_ended_at_exit_registers_only_a_group_created_inside(tmp_path, monkeypatch):
    registered = []
    monkeypatch.setattr(_dist.atexit, "register", registered.append)
    with _dist.ended_at_exit():
        pass
    assert registered == []  # nothing created
    with _dist.ended_at_exit():
        _init_one_process_group(tmp_path)
    assert registered == [_dist.destroy_process_group]
    with _dist.ended_at_exit():  # one existed before: not ours
        pass
    assert registered == [_dist.destroy_process_group]
    registered[0]()
    assert not dist.is_initialized()
    registered[0]()  # twice (the CLI's finally, then atexit): nothing happens


def test_harness_lm_under_torchrun_ends_the_group_it_creates(tmp_path, monkeypatch):
    """HarnessLM initialises the group itself when torchrun launched the process; the group it made is destroyed
    at exit. torchrun's environment is set and ``init_process_group`` makes a 1-process group (no second rank)."""
    pytest.importorskip("lm_eval")
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.evaluation import HarnessLM
    from lightning_llm.nn.transformer import Transformer

    tok = Tokenizer.train_bpe(["a small text to learn a few merges from"] * 4, vocab_size=300)
    net = Transformer(TransformerConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    backends = []
    real_init = dist.init_process_group

    def init_process_group(backend, **kwargs):
        backends.append(backend)
        real_init("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    registered = []
    monkeypatch.setattr(_dist.atexit, "register", registered.append)
    HarnessLM(net, tokenizer=tok, batch_size=2, device="cpu")
    assert backends == ["gloo"] and dist.is_initialized()
    assert registered == [_dist.destroy_process_group]
    registered[0]()
    assert not dist.is_initialized()


@pytest.mark.parametrize("strategy", ["fsdp2", "pipeline"])
def test_our_strategies_end_the_group_they_create(strategy, tmp_path, monkeypatch):
    """``FSDP2Strategy`` / ``PipelineStrategy.setup_environment`` create the group (through Lightning) and register
    its destruction; run here as one process (world size 1)."""
    from lightning_llm.parallel.presets import FSDP2Strategy, PipelineStrategy

    registered = []
    monkeypatch.setattr(_dist.atexit, "register", registered.append)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    s = FSDP2Strategy() if strategy == "fsdp2" else PipelineStrategy(pipeline_parallel_size=1)
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator

    s.accelerator = CPUAccelerator()
    s.cluster_environment = LightningEnvironment()
    s.parallel_devices = [torch.device("cpu")]
    s.set_world_ranks()
    s._lightning_module = torch.nn.Module()
    s.setup_environment()
    assert dist.is_initialized()
    assert _dist.destroy_process_group in registered
    _dist.destroy_process_group()


def _free_port() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from _launch import free_ports

    return free_ports(1)[0]


def _benchmark_script() -> str:
    """The script ``benchmarks/process_group_exit.py`` launches (collective, then exit), so the test runs the same."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("process_group_exit", ROOT / "benchmarks" / "process_group_exit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCRIPT


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_groups_exit_cleanly(tmp_path):
    """Twelve 2-process gloo groups that exit right after a collective all exit 0. Without ``ended_at_exit`` the
    same script (torch 2.13, this machine) aborted in 5 to 7 of 20 runs (``benchmarks/process_group_exit.py``), so
    twelve clean runs would happen by chance with probability about 0.75**12 = 0.03 or less."""
    script = tmp_path / "exit_after_collective.py"
    script.write_text(_benchmark_script())
    sys.path.insert(0, str(Path(__file__).parent))
    from _launch import free_ports

    for run in range(12):
        port = free_ports(1)[0]
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), "ended_at_exit"],
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "OMP_NUM_THREADS": "1",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "WORLD_SIZE": "2",
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for rank in range(2)
        ]
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"run {run}, rank {rank}: exit {proc.returncode}\n{out[-2000:]}"
