"""SIGKILL a real ``python -m lightning_llm fit`` and resume it: the run must end exactly where an uninterrupted one does.

The run is the quickstart made tiny: 32 training blocks in batches of 8 (4 steps per epoch: the block count is a
multiple of the batch size, the case where resuming at an epoch's end used to replay another permutation), 12 steps,
a validation every 4 steps (at each epoch's end), a checkpoint after every step (``step=<k>.ckpt`` and ``last.ckpt``,
written through ``AtomicCheckpointIO``). A :class:`StepRecorder` appends every step's exact loss and batch rows to a
file that survives the kill.

Kills: at precise points (``$FAULT_KILL``, executed by the run itself: during a checkpoint write, during validation,
at the last batch of an epoch before its checkpoint exists) and at random wall-clock moments (seeded). After each
kill: every ``*.ckpt`` on disk must load (no partial file under a final name), the run is resumed from the newest
complete checkpoint with ``--ckpt_path``, and the resumed steps must equal the uninterrupted run's bit for bit (loss
and batch), as must the final weights; no temporary file may be left behind.

Figures (cases, kills survived, largest loss difference) are printed with ``-s``; the default run covers the precise
kill points, ``-m slow`` adds random kills with more seeds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_llm.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from _faults_helpers import read_records  # noqa: E402

MAX_STEPS = 12
STEPS_PER_EPOCH = 4

#: every run: a one-layer model of width 32, no logger, progress bar or model summary
TINY_MODEL = ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32",
              "--model.init_args.config.n_head", "2"]  # fmt: skip
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]  # fmt: skip

TINY = [
    *TINY_MODEL, "--model.init_args.config.block_size", "32",
    "--data.init_args.vocab_size", "300", "--data.init_args.block_size", "32",
    "--data.init_args.batch_size", "8", "--data.init_args.max_train_blocks", "32",
    "--data.init_args.max_eval_blocks", "4",
    "--trainer.max_steps", str(MAX_STEPS), "--trainer.val_check_interval", str(STEPS_PER_EPOCH),
    "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
    *QUIET,
]  # fmt: skip


PPO_MAX_STEPS = 8
PPO_TINY = [
    *TINY_MODEL, "--model.init_args.ppo_epochs", "1",
    "--model.init_args.num_minibatches", "1", "--model.init_args.max_new_tokens", "4",
    "--data.init_args.num_train", "32", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "8",
    "--trainer.max_epochs", "-1", "--trainer.max_steps", str(PPO_MAX_STEPS),
    "--trainer.val_check_interval", "4", "--trainer.check_val_every_n_epoch", "null",
    *QUIET,
]  # fmt: skip

#: GRPO with a reference model (beta > 0): 4 prompt batches of 4 prompts x G = 4 completions per epoch, 1 step each
GRPO_MAX_STEPS = 8
GRPO_TINY = [
    *TINY_MODEL, "--model.init_args.num_generations", "4",
    "--model.init_args.beta", "0.04", "--model.init_args.log_completions_every_n_steps", "0",
    "--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "4",
    "--trainer.max_epochs", "-1", "--trainer.max_steps", str(GRPO_MAX_STEPS),
    "--trainer.val_check_interval", "4", "--trainer.check_val_every_n_epoch", "null",
    *QUIET,
]  # fmt: skip

#: the quickstart LM on 2 gloo processes (DDP): 16 blocks per rank, 2 steps per epoch, a validation per epoch
DDP_TINY = [*TINY, "--config", str(ROOT / "configs" / "trainer" / "cpu_ddp.yaml"), "--trainer.val_check_interval", "2"]
DDP_MAX_STEPS = 8

#: setup -> (config, overrides, max_steps): the quickstart LM (alone and under DDP), and PPO (4 prompt batches per
#: epoch, 1 step each)
SETUPS = {
    "causal_lm": ("quickstart.yaml", TINY, MAX_STEPS),
    "causal_lm_ddp": ("quickstart.yaml", [*DDP_TINY, "--trainer.max_steps", str(DDP_MAX_STEPS)], DDP_MAX_STEPS),
    "ppo": ("rlhf/ppo_quickstart.yaml", PPO_TINY, PPO_MAX_STEPS),
    "grpo": ("rlhf/grpo_quickstart.yaml", GRPO_TINY, GRPO_MAX_STEPS),
}


def _command(
    run: Path, ckpt_path: Path | None = None, setup: str = "causal_lm", resumed: bool | None = None
) -> list[str]:
    """The ``fit`` command line; its steps are recorded to ``resumed.jsonl`` for a resumption (``resumed``, by
    default whether a checkpoint is given: a run killed before its first checkpoint resumes from scratch), else to
    ``records.jsonl``."""
    config, tiny, _ = SETUPS[setup]
    cmd = [sys.executable, "-m", "lightning_llm", "fit", "--config", str(ROOT / "configs" / config), *tiny]
    cmd += ["--trainer.default_root_dir", str(run)]
    cmd += ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"]
    cmd += ["--trainer.callbacks.dirpath", str(run / "ckpt"), "--trainer.callbacks.filename", "{step}"]
    cmd += ["--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]
    cmd += ["--trainer.callbacks.save_last", "true"]
    cmd += ["--trainer.callbacks+=_faults_helpers.StepRecorder"]
    resumed = ckpt_path is not None if resumed is None else resumed
    cmd += ["--trainer.callbacks.path", str(run / ("resumed.jsonl" if resumed else "records.jsonl"))]
    cmd += ["--trainer.callbacks+=_faults_helpers.Killer"]
    if ckpt_path is not None:
        cmd += ["--ckpt_path", str(ckpt_path)]
    return cmd


def _env(kill: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    env.pop("FAULT_KILL", None)
    if kill is not None:
        env["FAULT_KILL"] = kill
    return env


def _run(
    run: Path,
    ckpt_path: Path | None = None,
    kill: str | None = None,
    setup: str = "causal_lm",
    resumed: bool | None = None,
) -> subprocess.CompletedProcess:
    run.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        _command(run, ckpt_path, setup, resumed), cwd=run, env=_env(kill), capture_output=True, text=True, timeout=600
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_records(run / "records.jsonl")
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    assert [r["epoch"] for r in records] == [s // STEPS_PER_EPOCH for s in range(MAX_STEPS)]
    return run, records


FIGURES: dict = {"cases": 0, "kills_survived": 0, "max_abs_loss_diff": 0.0, "killed_at_step": [], "resumed_from": []}


def _check_checkpoints_and_resume(
    run: Path, reference_run: Path, reference_records: list[dict], setup: str = "causal_lm"
) -> int:
    """Every checkpoint on disk loads; resume from the newest; compare with the reference. Returns its step."""
    ckpt_dir = run / "ckpt"
    finals = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.exists() else []
    steps = []
    for path in finals:  # no partial file is ever visible under a checkpoint's final name
        checkpoint = load_checkpoint(path)
        if path.name != "last.ckpt":
            assert checkpoint["global_step"] == int(path.stem.split("=")[1]), path
            steps.append(checkpoint["global_step"])
    killed_records = read_records(run / "records.jsonl")
    for got, want in zip(killed_records, reference_records):  # before the kill, it was the same run
        assert (got["step"], got["loss"], got["batch"], got["weights"]) == (
            want["step"],
            want["loss"],
            want["batch"],
            want["weights"],
        )
    FIGURES["killed_at_step"].append(len(killed_records))
    resume_step = max(steps, default=0)
    if (ckpt_dir / "last.ckpt").exists():
        assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] in (resume_step - 1, resume_step)
    FIGURES["resumed_from"].append(resume_step)
    proc = _run(run, ckpt_dir / f"step={resume_step}.ckpt" if resume_step else None, setup=setup, resumed=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = read_records(run / "resumed.jsonl")
    expected = reference_records[resume_step:]
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    for got, want in zip(resumed, expected):
        assert got["batch"] == want["batch"], f"step {want['step']}: trained on other rows after resuming"
        if want["loss"] is not None:
            diff = abs(float.fromhex(got["loss"]) - float.fromhex(want["loss"]))
            FIGURES["max_abs_loss_diff"] = max(FIGURES["max_abs_loss_diff"], diff)
            assert got["loss"] == want["loss"], f"step {want['step']}: loss differs by {diff}"
        assert got["weights"] == want["weights"], f"step {want['step']}: weights differ after the step"
    max_steps = SETUPS[setup][2]
    final, ref_final = _weights(ckpt_dir / f"step={max_steps}.ckpt"), _weights(reference_run / "ckpt" / "last.ckpt")
    assert final.keys() == ref_final.keys()
    for name in final:
        assert torch.equal(final[name], ref_final[name]), name
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]  # the killed write's file is cleaned
    return resume_step


PRECISE_KILLS = {
    # kill point: the step of the newest complete checkpoint afterwards
    "checkpoint_write:4:2": 4,  # writing last.ckpt after step 4: step=4.ckpt, the epoch's last batch, is complete
    "checkpoint_write:6:1": 5,  # writing step=6.ckpt (mid-epoch): a half-written temporary file, step 5 remains
    "validation:8": 8,  # during the validation after step 8 (an epoch's end; its checkpoints are already written)
    "train_batch_end:4": 3,  # right after the last batch of epoch 0, before its checkpoint exists
    "train_batch_end:5": 4,  # right after the first batch of epoch 1
}


DEFAULT_KILLS = ("checkpoint_write:4:2", "validation:8")  # the rest are slow-marked (about 9 s each)


@pytest.mark.parametrize(
    "kill", [k if k in DEFAULT_KILLS else pytest.param(k, marks=pytest.mark.slow) for k in PRECISE_KILLS]
)
def test_kill_at_a_precise_point_then_resume_is_exact(reference, tmp_path, kill):
    ref_run, ref_records = reference
    run = tmp_path / "run"
    proc = _run(run, kill=kill)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {kill}: {proc.stderr[-2000:]}"
    FIGURES["cases"] += 1
    assert _check_checkpoints_and_resume(run, ref_run, ref_records) == PRECISE_KILLS[kill]
    FIGURES["kills_survived"] += 1


def _random_kill(run: Path, rng: random.Random, step_seconds: float) -> None:
    """Start the run and SIGKILL it at a random moment after a random step was recorded (within about 1.5 steps:
    during that step's checkpoint writes, the next step, or a validation)."""
    target, delay = rng.randint(1, MAX_STEPS - 1), rng.uniform(0.0, 1.5 * step_seconds)
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(_command(run), cwd=run, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = run / "records.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if records.exists() and len(read_records(records)) >= target:
                time.sleep(delay)
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_kill_at_a_random_moment_then_resume_is_exact(reference, tmp_path, seed):
    ref_run, ref_records = reference
    run = tmp_path / "run"
    times = [r["time"] for r in ref_records]
    _random_kill(run, random.Random(seed), step_seconds=(times[-1] - times[0]) / (len(times) - 1))
    FIGURES["cases"] += 1
    _check_checkpoints_and_resume(run, ref_run, ref_records)
    FIGURES["kills_survived"] += 1


@pytest.fixture(scope="module")
def ppo_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ppo_uninterrupted")
    proc = _run(run, setup="ppo")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_records(run / "records.jsonl")
    assert [r["step"] for r in records] == list(range(1, PPO_MAX_STEPS + 1))
    assert [r["epoch"] for r in records] == [s // 4 for s in range(PPO_MAX_STEPS)]
    return run, records


@pytest.mark.parametrize(
    "kill",
    [
        "train_batch_end:4",
        *(pytest.param(k, marks=pytest.mark.slow) for k in ("checkpoint_write:6:1", "train_batch_end:6")),
    ],
)
def test_ppo_kill_then_resume_is_exact(ppo_reference, tmp_path, kill):
    """PPO: rollouts (sampling generator), the KL controller and the prompt order must all resume exactly."""
    ref_run, ref_records = ppo_reference
    run = tmp_path / "run"
    proc = _run(run, kill=kill, setup="ppo")
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {kill}: {proc.stderr[-2000:]}"
    FIGURES["cases"] += 1
    _check_checkpoints_and_resume(run, ref_run, ref_records, setup="ppo")
    FIGURES["kills_survived"] += 1


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo_uninterrupted")
    proc = _run(run, setup="grpo")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_records(run / "records.jsonl")
    assert [r["step"] for r in records] == list(range(1, GRPO_MAX_STEPS + 1))
    assert [r["epoch"] for r in records] == [s // 4 for s in range(GRPO_MAX_STEPS)]
    return run, records


@pytest.mark.parametrize("kill", ["train_batch_end:5", pytest.param("checkpoint_write:6:1", marks=pytest.mark.slow)])
def test_grpo_kill_then_resume_is_exact(grpo_reference, tmp_path, kill):
    """GRPO: the group rollouts (sampling generator), the reference model and the prompt order resume exactly."""
    ref_run, ref_records = grpo_reference
    run = tmp_path / "run"
    proc = _run(run, kill=kill, setup="grpo")
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {kill}: {proc.stderr[-2000:]}"
    FIGURES["cases"] += 1
    _check_checkpoints_and_resume(run, ref_run, ref_records, setup="grpo")
    FIGURES["kills_survived"] += 1


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp_uninterrupted")
    proc = _run(run, setup="causal_lm_ddp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_records(run / "records.jsonl")  # rank 0's steps
    assert [r["step"] for r in records] == list(range(1, DDP_MAX_STEPS + 1))
    assert [r["epoch"] for r in records] == [s // 2 for s in range(DDP_MAX_STEPS)]
    return run, records


@pytest.mark.distributed
@pytest.mark.parametrize("kill", ["train_batch_end:4", pytest.param("checkpoint_write:5:1", marks=pytest.mark.slow)])
def test_ddp_kill_then_resume_is_exact(ddp_reference, tmp_path, kill):
    """2-process DDP: every rank kills itself at the same point (a checkpoint write kills rank 0, and rank 1 stops
    at its next collective); the resumed run equals the uninterrupted one bit for bit on rank 0."""
    ref_run, ref_records = ddp_reference
    run = tmp_path / "run"
    proc = _run(run, kill=kill, setup="causal_lm_ddp")
    assert proc.returncode != 0, f"the run was not killed at {kill}: {proc.stderr[-2000:]}"
    FIGURES["cases"] += 1
    _check_checkpoints_and_resume(run, ref_run, ref_records, setup="causal_lm_ddp")
    FIGURES["kills_survived"] += 1


def test_report_figures(request):
    """Prints the figures of the kills run so far in this session (``pytest -s``)."""
    print("\n[faults] " + json.dumps(FIGURES))
    assert FIGURES["kills_survived"] == FIGURES["cases"]
