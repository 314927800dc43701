"""Two CPU processes (gloo): DDP, FSDP2 and FSDP2 + TP against one process, exact resume, consolidation, presets.

Every distributed run is launched once (``tests/parallel/_harness.py``, all in parallel) and read by several tests.
Reference for the loss trajectories: the same model, seed and global batch trained in ONE process (batch 8 = 2 ranks
x 4 for DDP / FSDP2; batch 8 on both tensor-parallel ranks, which form one data-parallel rank). Tolerance: fp32, the
runs differ only in reduction order (all-reduce / reduce-scatter of gradients, row-parallel partial sums), measured
differences are ~1e-6; we allow rtol=1e-5, atol=1e-5 on every one of the 8 step losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
ALIBI = ["--pos-encoding", "alibi", "--no-resume", "--steps", "4", "--save-at", "2"]
# run name -> (strategy, per-rank batch size, extra arguments)
RUNS = {
    "single": ("single", 8, []),
    "ddp": ("ddp", 4, []),
    "fsdp2": ("fsdp2", 4, []),
    "fsdp2_tp": ("fsdp2_tp", 8, []),
    "single_alibi": ("single", 8, ALIBI),  # ALiBi under TP: each rank must take its own slice of the head slopes
    "fsdp2_tp_alibi": ("fsdp2_tp", 8, ALIBI),
}
TIMEOUT = 420


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("harness")
    procs = {}
    for name, (strategy, bs, extra) in RUNS.items():
        cmd = [sys.executable, str(HERE / "_harness.py"), "--strategy", strategy, "--batch-size", str(bs), *extra]
        cmd += ["--out", str(out / f"{name}.json")]
        log = open(out / f"{name}.log", "w")  # noqa: SIM115
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log)
    results = {}
    for name, (proc, log) in procs.items():
        proc.wait(timeout=TIMEOUT)
        log.close()
        path = out / f"{name}.json"
        assert proc.returncode == 0 and path.is_file(), (out / f"{name}.log").read_text()[-4000:]
        results[name] = json.loads(path.read_text())
    return results


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_tp"])
def test_loss_trajectory_matches_single_process(runs, name):
    assert runs[name]["world_size"] == 2
    ref, got = torch.tensor(runs["single"]["losses"]), torch.tensor(runs[name]["losses"])
    assert len(ref) == 8 and ref[-1] < ref[0]  # it learns
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_alibi_matches_single_process(runs):
    ref, got = torch.tensor(runs["single_alibi"]["losses"]), torch.tensor(runs["fsdp2_tp_alibi"]["losses"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp2", "fsdp2_tp"])
def test_mid_epoch_resume_is_exact(runs, name):
    # 24 blocks / global batch 8 = 3 steps per epoch; saved after step 4 (mid epoch 1), resumed for steps 5..8
    run = runs[name]
    torch.testing.assert_close(torch.tensor(run["resumed_losses"]), torch.tensor(run["losses"][4:]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_tp"])
def test_validation_metrics_are_synced(runs, name):
    # val/ppl is a torchmetrics sum state (synced); each rank saw half of the val blocks under DDP/FSDP2
    ref = runs["single"]["val"]
    assert runs[name]["val"]["val/ppl"] == pytest.approx(ref["val/ppl"], rel=1e-5)
    assert runs[name]["val"]["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-5)


def test_fsdp2_halves_param_and_optimizer_memory(runs):
    ddp, fsdp2 = runs["ddp"]["bytes"], runs["fsdp2"]["bytes"]
    assert fsdp2["total_bytes"] <= 0.55 * ddp["total_bytes"]


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_tp"])
def test_plan_matches_measured_shards(runs, name):
    """plan()'s persistent per-rank parameter + AdamW bytes vs the local DTensor shards measured on rank 0."""
    from lightning_llm.config import TransformerConfig
    from lightning_llm.parallel import plan

    cfg = TransformerConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    rows = {r["strategy"]: r for r in plan(cfg, 2, "32-true", activation_checkpointing=False)["rows"]}
    row = rows[{"ddp": "DDP", "fsdp2": "FSDP FULL_SHARD", "fsdp2_tp": "FSDP2+TP (d=1, t=2)"}[name]]
    measured = runs[name]["bytes"]["total_bytes"]
    estimate = row["sharded_params_bytes"] + row["optimizer_bytes"]
    assert abs(estimate - measured) / measured < 0.01  # stated error: < 1% (0% here: no dim-0 padding needed)


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_tp"])
def test_consolidated_checkpoint_loads_without_process_group(runs, name, tmp_path):
    import torch.distributed as dist

    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.parallel import consolidate_checkpoint

    sharded = Path(runs[name]["checkpoint"])
    assert sharded.is_dir() and (sharded / ".metadata").is_file()
    out = tmp_path / "full.ckpt"
    assert consolidate_checkpoint(sharded, out) == out
    assert not dist.is_initialized()
    model = CausalLM.load_from_checkpoint(out)
    # reference: the single-process run's checkpoint at the same step (identical training up to fp32 reduction order)
    ref = torch.load(runs["single"]["checkpoint"], weights_only=True)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["global_step"] == ref["global_step"] == 4
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    ref_opt, opt = ref["optimizer_states"][0], ckpt["optimizer_states"][0]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    for i, state in ref_opt["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-6)
    with pytest.raises(FileExistsError):
        consolidate_checkpoint(sharded, out)
    with pytest.raises(ValueError, match="metadata"):
        consolidate_checkpoint(tmp_path, tmp_path / "x.ckpt")


# ---------------------------------------------------------------------------------------------------- CLI presets
TINY = [
    "--trainer.max_steps", "3",
    "--trainer.val_check_interval", "3",
    "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false",
    "--model.init_args.config.n_layer", "1",
    "--model.init_args.config.n_embd", "64",
    "--model.init_args.config.block_size", "32",
    "--data.init_args.vocab_size", "512",
    "--data.init_args.block_size", "32",
    "--data.init_args.batch_size", "4",
    "--data.init_args.max_train_blocks", "32",
    "--data.init_args.max_eval_blocks", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_cache():
    """Train the small tokenizer and pack the streams once, so the two ranks of every run only read the cache."""
    from lightning_llm.data.text import TextDataModule

    TextDataModule("embedded", vocab_size=512, block_size=32).prepare_data()


@pytest.mark.usefixtures("data_cache")
@pytest.mark.parametrize("preset", ["cpu_ddp", "cpu_fsdp2", "cpu_fsdp2_tp"])
def test_cli_preset_trains_on_two_processes(preset, tmp_path):
    cmd = [sys.executable, "-m", "lightning_llm", "fit", "--config", "configs/quickstart.yaml"]
    cmd += ["--config", f"configs/trainer/{preset}.yaml", *TINY]
    cmd += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads(next(tmp_path.rglob("fit_metrics.json")).read_text())
    assert metrics["val/ppl"] > 1 and "train/loss" in metrics
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts and (ckpts[0].is_dir() == (preset != "cpu_ddp"))  # FSDP2 presets write sharded folders


@pytest.mark.parametrize("preset", ["cpu_ddp", "cpu_fsdp2", "cpu_fsdp2_tp", "gpu_ddp", "gpu_fsdp", "gpu_fsdp2"])
def test_every_trainer_preset_parses(preset, capsys):
    import yaml

    from lightning_llm.cli import main

    status = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                   str(ROOT / f"configs/trainer/{preset}.yaml"), "--print_config"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    expected = yaml.safe_load((ROOT / f"configs/trainer/{preset}.yaml").read_text())["trainer"].get("strategy")
    if isinstance(expected, dict):  # the class the preset names is the one the CLI resolves
        assert yaml.safe_load(out)["trainer"]["strategy"]["class_path"] == expected["class_path"]


# ---------------------------------------------------------------------------------------------------- CUDA (FSDP v1)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy needs CUDA (Lightning refuses it on CPU)")
@pytest.mark.parametrize("sharding", ["FULL_SHARD", "SHARD_GRAD_OP"])
def test_block_fsdp_on_cuda_matches_single_device(tmp_path, sharding):
    n = torch.cuda.device_count()
    cmd = [sys.executable, str(HERE / "_harness.py"), "--accelerator", "gpu", "--devices", str(n), "--no-resume"]
    common = ["--batch-size", "4", "--steps", "4", "--save-at", "2"]
    single = tmp_path / "single.json"
    subprocess.run([*cmd, "--strategy", "single", *common[:1], str(4 * n), *common[2:], "--out", str(single)],
                   cwd=ROOT, env=_env(), check=True, timeout=TIMEOUT)  # fmt: skip
    out = tmp_path / "fsdp.json"
    kwargs = json.dumps({"sharding_strategy": sharding, "activation_checkpointing": True})
    subprocess.run([*cmd, "--strategy", "fsdp", "--strategy-kwargs", kwargs, *common, "--out", str(out)],
                   cwd=ROOT, env=_env(), check=True, timeout=TIMEOUT)  # fmt: skip
    ref, got = json.loads(single.read_text())["losses"], json.loads(out.read_text())["losses"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)


def test_meta_init_tensor_parallel_alibi(tmp_path):
    """Meta-device init under TP: reset_parameters rebuilds all H slopes, parallelize slices them again per rank."""
    from lightning_llm.nn.alibi import alibi_slopes

    out = tmp_path / "meta_tp.json"
    cmd = [sys.executable, str(HERE / "_meta_tp_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    full = alibi_slopes(4).tolist()
    assert result["slopes"] == [full[:2], full[2:]]  # rank r owns heads 2r, 2r + 1 (ColwiseParallel's slices)
    assert result["max_abs_diff"] < 1e-5  # the sharded model computes what the plain model with its weights does
