"""Pipeline parallelism (torch.distributed.pipelining under Lightning) against one process, on CPU with gloo.

Reference: the same model (4 blocks), seed and global batch (8 blocks of 32 tokens) trained in ONE process without
any strategy (``_pipeline_worker.py --pp 0``). Every pipelined run must give, to 1e-5 (fp32; the runs differ only in
the order of sums: per micro-batch loss sums, the clipping norm summed over stages, FSDP's reduce-scatter):

* the loss of each of the 10 steps (gradient clipping at 1.0 is active, so the cross-stage norm is exercised too);
* every parameter's gradient before the first optimizer step, each parameter found on exactly one pipeline rank
  (embeddings on the first stage, head on the last);
* the validation perplexity and loss, run forward-only through the pipeline;
* the losses of steps 5-10 after resuming from the sharded (DCP) checkpoint of step 4 (exact resume);
* the consolidated checkpoint (``consolidate_checkpoint`` / ``lightning-llm export``): the single run's weights and
  optimizer state, in its parameter order.

The default runs (one process, 1F1B and interleaved 1F1B on 2 processes, and the CLI preset) are launched once, in
parallel, and read by several tests; the other schedules, pipeline x FSDP2 and pipeline x tensor parallel (4
processes each) are marked slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from _launch import run_all  # noqa: E402

TIMEOUT = 480
DEFAULT_RUNS = {
    "single": ["--pp", "0", "--no-resume"],
    "1f1b": ["--schedule", "1f1b"],
    "interleaved_1f1b": ["--schedule", "interleaved_1f1b", "--no-resume"],  # 2 ranks x 2 stages
}
SLOW_RUNS = {
    "gpipe": ["--schedule", "gpipe", "--no-resume"],
    "looped_bfs": ["--schedule", "looped_bfs", "--no-resume"],
    "interleaved_zero_bubble": ["--schedule", "interleaved_zero_bubble", "--no-resume"],
    "zbv_zero_bubble": ["--schedule", "zbv_zero_bubble", "--no-resume", "--val-batches", "0"],  # no forward-only mode
    "pp_fsdp2": ["--schedule", "1f1b", "--devices", "4", "--batch-size", "4"],  # 2 stages x 2 FSDP2 ranks, 4 per rank
    "pp_tp": ["--schedule", "1f1b", "--devices", "4", "--strategy-kwargs", '{"tensor_parallel_size": 2}'],
}
CLI_TINY = [
    "--trainer.max_steps", "3",
    "--trainer.val_check_interval", "3",
    "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false",
    "--model.init_args.config.n_embd", "64",
    "--model.init_args.config.block_size", "32",
    "--data.init_args.vocab_size", "512",
    "--data.init_args.block_size", "32",
    "--data.init_args.batch_size", "4",
    "--data.init_args.max_train_blocks", "32",
    "--data.init_args.max_eval_blocks", "4",
]  # fmt: skip


def _launch(out: Path, runs: dict[str, list[str]], cli: dict[str, str] | None = None) -> dict[str, dict]:
    commands = {}
    for name, extra in runs.items():
        commands[name] = [sys.executable, str(HERE / "_pipeline_worker.py"), *extra, "--out", str(out / f"{name}.json")]
    for name, preset in (cli or {}).items():
        root = out / name
        cmd = [sys.executable, "-m", "lightning_llm", "fit", "--config", "configs/quickstart.yaml"]
        cmd += ["--config", f"configs/trainer/{preset}.yaml", *CLI_TINY]
        cmd += ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
        commands[name] = cmd
    run_all(commands, out, ROOT, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, TIMEOUT)
    results = {}
    for name in commands:
        if name in runs:
            results[name] = json.loads((out / f"{name}.json").read_text())
            results[name]["grads"] = [torch.load(p) for p in sorted(out.glob(f"{name}_grads_rank*.pt"))]
        else:
            results[name] = {"root": out / name}
    return results


@pytest.fixture(scope="module")
def data_cache():
    from lightning_llm.data.text import TextDataModule

    TextDataModule("embedded", vocab_size=512, block_size=32).prepare_data()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict[str, dict]:
    return _launch(tmp_path_factory.mktemp("pipeline"), DEFAULT_RUNS, {"cli_cpu_pp": "cpu_pp"})


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory, runs) -> dict[str, dict]:
    return {
        **runs,
        **_launch(tmp_path_factory.mktemp("pipeline_slow"), SLOW_RUNS, {"cli_cpu_pp_fsdp2": "cpu_pp_fsdp2"}),
    }


def _check_losses(all_runs: dict, name: str) -> None:
    ref, got = torch.tensor(all_runs["single"]["losses"]), torch.tensor(all_runs[name]["losses"])
    assert len(ref) == 10 and ref[-1] < ref[0]  # it learns
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _check_grads(all_runs: dict, name: str) -> None:
    (ref,) = all_runs["single"]["grads"]
    per_rank = all_runs[name]["grads"]
    owners: dict[str, list[int]] = {}
    merged = {}
    for rank, grads in enumerate(per_rank):
        for key, g in grads.items():
            owners.setdefault(key, []).append(rank)
            if key in merged:  # replicated over data / tensor parallel ranks: the same full gradient
                torch.testing.assert_close(g, merged[key], rtol=1e-5, atol=1e-7)
            merged[key] = g
    assert set(merged) == set(ref)
    per_stage = len(per_rank) // 2  # mesh (pipeline, data, tensor), row-major: global rank // per_stage = pp rank
    assert {r // per_stage for r in owners["model.wte.weight"]} == {0}  # the embeddings: first stage only
    last = 0 if name == "zbv_zero_bubble" else 1  # V shape: pipeline rank 0 holds stages 0 and 3
    assert {r // per_stage for r in owners["model.lm_head.weight"]} == {last}  # head (+ loss): the last stage
    for key, g in ref.items():
        torch.testing.assert_close(merged[key], g, rtol=1e-5, atol=1e-7, msg=key)


def _check_val(all_runs: dict, name: str) -> None:
    ref = all_runs["single"]["val"]
    assert all_runs[name]["val"]["val/ppl"] == pytest.approx(ref["val/ppl"], rel=1e-5)
    assert all_runs[name]["val"]["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------- default runs
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b"])
def test_loss_trajectory_matches_single_process(runs, name):
    assert runs[name]["world_size"] == 2
    _check_losses(runs, name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b"])
def test_every_stage_gradient_matches_single_process(runs, name):
    _check_grads(runs, name)
    on_rank = [set(g) for g in runs[name]["grads"]]
    assert not on_rank[0] & on_rank[1]  # pure pipeline parallel: disjoint parameters


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b"])
def test_validation_runs_through_the_pipeline(runs, name):
    _check_val(runs, name)


@pytest.mark.distributed
def test_mid_epoch_resume_is_exact(runs):
    # 24 blocks / batch 8 = 3 steps per epoch; saved after step 4 (mid epoch 1), resumed for steps 5..10
    run = runs["1f1b"]
    torch.testing.assert_close(torch.tensor(run["resumed_losses"]), torch.tensor(run["losses"][4:]), rtol=0, atol=1e-6)


@pytest.mark.distributed
def test_plan_matches_measured_stage_memory(runs):
    """plan()'s per-rank parameter + AdamW bytes for 1F1B on 2 stages vs the local bytes measured on rank 0.

    The planner reports the heaviest stage: blocks split 2 + 2, the first stage adds the embedding (96 x 32), the last
    the final norm (32) and the untied head (96 x 32), so the last is heavier by the norm's 32 parameters (0.1%)."""
    from lightning_llm.config import TransformerConfig
    from lightning_llm.parallel import plan

    cfg = TransformerConfig(vocab_size=96, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    rows = plan(cfg, 2, "32-true", activation_checkpointing=False, pipeline_parallel_size=2)["rows"]
    row = next(r for r in rows if r["schedule"] == "1f1b" and r["pipeline_parallel_size"] == 2)
    measured = runs["1f1b"]["bytes"]["total_bytes"]  # rank 0: its stage's parameters + AdamW state
    estimate = row["sharded_params_bytes"] + row["optimizer_bytes"]
    assert measured <= estimate and (estimate - measured) / measured < 0.01


def test_consolidated_pipeline_checkpoint_equals_single_process(runs, tmp_path):
    import torch.distributed as dist

    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.parallel import consolidate_checkpoint

    sharded = Path(runs["1f1b"]["checkpoint"])
    assert sharded.is_dir() and (sharded / ".metadata").is_file()
    out = consolidate_checkpoint(sharded, tmp_path / "full.ckpt")
    assert not dist.is_initialized()
    ref = torch.load(runs["single"]["checkpoint"], weights_only=True)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["global_step"] == ref["global_step"] == 4
    assert list(ckpt["state_dict"]) == list(ref["state_dict"])  # the unsplit model's keys, in its order
    model = CausalLM.load_from_checkpoint(out)
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    ref_opt, opt = ref["optimizer_states"][0], ckpt["optimizer_states"][0]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    assert [g["weight_decay"] for g in opt["param_groups"]] == [g["weight_decay"] for g in ref_opt["param_groups"]]
    for i, state in ref_opt["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(opt["state"][i]["step"], state["step"])


@pytest.mark.distributed
def test_cli_cpu_pp_preset_trains_validates_and_exports(runs, tmp_path):
    root = runs["cli_cpu_pp"]["root"]
    metrics = json.loads(next(root.rglob("fit_metrics.json")).read_text())
    assert metrics["val/ppl"] > 1 and "train/loss" in metrics
    (ckpt,) = list(root.rglob("*.ckpt"))
    assert ckpt.is_dir()  # sharded: each process wrote its stages
    from lightning_llm.cli import main

    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")]) in (0, None)
    assert (tmp_path / "hf" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------- slow runs
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SLOW_RUNS))
def test_other_schedules_and_compositions_match_single_process(slow_runs, name):
    _check_losses(slow_runs, name)
    _check_grads(slow_runs, name)
    if name != "zbv_zero_bubble":
        _check_val(slow_runs, name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["pp_fsdp2", "pp_tp"])
def test_resume_under_composition_is_exact(slow_runs, name):
    run = slow_runs[name]
    assert run["world_size"] == 4
    torch.testing.assert_close(torch.tensor(run["resumed_losses"]), torch.tensor(run["losses"][4:]), rtol=0, atol=2e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_x_fsdp2_shards_each_stage(slow_runs):
    # per-rank parameter + AdamW bytes: pipeline halves the model, FSDP2 halves each stage again
    pp, pp_fsdp = slow_runs["1f1b"]["bytes"]["total_bytes"], slow_runs["pp_fsdp2"]["bytes"]["total_bytes"]
    assert pp_fsdp <= 0.55 * pp


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_cpu_pp_fsdp2_preset_trains(slow_runs):
    root = slow_runs["cli_cpu_pp_fsdp2"]["root"]
    metrics = json.loads(next(root.rglob("fit_metrics.json")).read_text())
    assert metrics["val/ppl"] > 1 and "train/loss" in metrics


# ---------------------------------------------------------------------------------------------------- no processes
class _FakeMesh:
    """What split_model reads from a 1-D pipeline DeviceMesh, for rank ``rank`` of ``size`` (no process group)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank

    def get_group(self) -> None:
        return None


def _tiny(n_layer: int = 4, **kw):
    from lightning_llm.config import TransformerConfig
    from lightning_llm.nn.transformer import Transformer

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, **kw)
    return Transformer(cfg)


@pytest.mark.parametrize(
    ("schedule", "p", "pos"),
    [("1f1b", 2, "rope"), ("interleaved_1f1b", 2, "learned"), ("zbv_zero_bubble", 2, "alibi"), ("gpipe", 4, "rope")],
)
def test_stage_modules_chained_equal_the_unsplit_model(schedule, p, pos):
    """Each rank's pruned model keeps the original parameter names; its stages, run in order, give the full logits."""
    import copy

    from lightning_llm.parallel import split_model

    kw = {"attention_backend": "eager"} if pos == "alibi" else {}
    full = _tiny(pos_encoding=pos, **kw).eval()
    ids = torch.randint(0, 50, (3, 16))
    stages, names = {}, []
    for rank in range(p):
        model = split_model(copy.deepcopy(full), _FakeMesh(p, rank), schedule=schedule)
        names += list(model.state_dict())
        for module in model.pipeline.build_stage_modules():
            stages[module.stage_index] = module
        with pytest.raises(RuntimeError, match="split for pipeline parallelism"):
            model(ids)
    assert sorted(names) == sorted(full.state_dict())  # every parameter on exactly one rank, same names
    x = ids
    for s in sorted(stages):
        x = stages[s](x)
    torch.testing.assert_close(x, full(ids), rtol=1e-5, atol=1e-5)


def test_first_stage_holds_embeddings_last_holds_head():
    from lightning_llm.parallel import split_model

    first = split_model(_tiny(), _FakeMesh(2, 0))
    last = split_model(_tiny(), _FakeMesh(2, 1))
    assert first.wte is not None and first.lm_head is None and first.norm_f is None
    assert last.wte is None and last.lm_head is not None and last.norm_f is not None
    assert list(first.blocks) == ["0", "1"] and list(last.blocks) == ["2", "3"]
    assert first.pipeline.stage_ids == [0] and last.pipeline.stage_ids == [1]


def test_split_layers_balances_and_refuses():
    from lightning_llm.parallel import split_layers

    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(ValueError, match=r"n_layer=6 is not divisible by the 4 pipeline stages.*balance='params'"):
        split_layers(6, 4)
    with pytest.raises(ValueError, match="Cannot split a model with n_layer=2 blocks into 4 pipeline stages"):
        split_layers(2, 4)
    # params: a heavy embedding on stage 0 and a heavy head on the last stage get fewer blocks
    sizes = [len(r) for r in split_layers(6, 3, "params", [1.0] * 6, first_cost=2.0, last_cost=2.0)]
    costs = [sizes[0] + 2.0, sizes[1], sizes[2] + 2.0]
    assert max(costs) == 4.0 and sizes[0] < sizes[1]  # optimum (brute force: no split has a stage below 4)
    assert [len(r) for r in split_layers(5, 2, "params")] in ([3, 2], [2, 3])
    assert [len(r) for r in split_layers(5, 2, layers_per_stage=[4, 1])] == [4, 1]
    with pytest.raises(ValueError, match="layers_per_stage"):
        split_layers(5, 2, layers_per_stage=[5, 0])


def test_split_model_errors():
    from lightning_llm.parallel import split_model

    with pytest.raises(ValueError, match="tie_embeddings=True"):
        split_model(_tiny(tie_embeddings=True), _FakeMesh(2, 0))
    with pytest.raises(ValueError, match="not divisible"):
        split_model(_tiny(n_layer=3), _FakeMesh(2, 0))
    assert list(split_model(_tiny(n_layer=3), _FakeMesh(2, 0), balance="params").blocks) in (["0"], ["0", "1"])
    with pytest.raises(TypeError, match="cannot be split"):
        split_model(torch.nn.Linear(2, 2), _FakeMesh(2, 0))
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        split_model(_tiny(), _FakeMesh(2, 0), schedule="pipedream")
    with pytest.raises(ValueError, match="exactly 1 stage"):
        split_model(_tiny(), _FakeMesh(2, 0), schedule="1f1b", stages_per_rank=2)
    model = split_model(_tiny(), _FakeMesh(2, 0), n_microbatches=3)
    with pytest.raises(ValueError, match="batch size 4 is not divisible by n_microbatches=3"):
        model.pipeline.train_step(torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long))


def test_bubble_fraction():
    from lightning_llm.parallel import bubble_fraction

    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)  # (p - 1) / (m + p - 1)
    assert bubble_fraction("gpipe", 1, 8) == 0.0
    assert bubble_fraction("interleaved_1f1b", 4, 8, v=2) == pytest.approx(3 / 19)  # (p - 1) / (v m + p - 1)
    assert bubble_fraction("interleaved_zero_bubble", 4, 8, v=2) < bubble_fraction("interleaved_1f1b", 4, 8, v=2)
