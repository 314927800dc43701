"""HarnessLM data-parallel: 2 gloo processes under torchrun give exactly the one-process results (CPU).

``_harness_dist_worker.py`` runs ``lm_eval.simple_evaluate`` on the five tiny local tasks of ``test_harness.py`` (a
LAMBADA-style cloze, multiple choice, rolling perplexity, generate_until) and then calls ``loglikelihood``,
``loglikelihood_rolling`` and ``generate_until`` directly on the harness's request instances. It is launched twice,
in parallel: as one plain process (the reference) and under ``torchrun --standalone --nproc-per-node 2``, where
HarnessLM initialises the gloo group from torchrun's environment and shards its batches. Checked:

* rank 0's ``simple_evaluate`` metrics and per-sample responses equal the one-process run's exactly (same batches,
  one thread each, so the same floats), and rank 1 gets ``None`` from it, as lm-eval returns results only where
  ``LOCAL_RANK`` is 0;
* EVERY rank's direct outputs equal the one-process outputs, in the original order (results gathered to all ranks);
* each rank computed a real share: both did some batches, and their batches, rows and padded tokens add up to the
  one-process run's (no batch done twice, none skipped);
* the harness's own sharding stays off (``lm.rank`` 0 and ``lm.world_size`` 1 on every rank);
* a unit of work failing on rank 1 raises on BOTH ranks (none waits forever), and ranks handed different requests
  raise a clear error instead of returning a mix.

The one-process run itself equals lm-eval's ``HFLM`` (``test_harness.py``), so the sharded results do too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _launch import run_all  # noqa: E402
from test_harness import TASKS, build_tiny_gpt2, write_tasks  # noqa: E402

pytestmark = pytest.mark.distributed
WORKER = HERE / "_harness_dist_worker.py"
TIMEOUT = 300
CLI_OFF = ("perplexity", "lambada", "multiple_choice", "robustness", "fairness", "efficiency", "bias", "embeddings")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("harness_dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_dir = build_tiny_gpt2(tmp / "model")
    finally:
        torch.set_num_threads(threads)
    task_dir = write_tasks(tmp / "tasks")
    args = [str(WORKER), str(model_dir), str(task_dir)]
    commands = {
        "single": [sys.executable, *args, str(tmp / "single")],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
                str(tmp / "ddp")],
        # the product as people run it: `lightning-llm evaluate` under torchrun (only its harness part)
        "cli": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "lightning_llm", "evaluate", "--model", str(model_dir), "--out", str(tmp / "cli" / "report"),
                "--device", "cpu", "--verbose", "false", "--plots", "false", "--harness.enabled", "true",
                "--harness.tasks", "[tiny_cloze, tiny_mc]", "--harness.include_path", str(task_dir),
                "--harness.include_defaults", "false",
                *(arg for part in CLI_OFF for arg in (f"--{part}.enabled", "false"))],
    }  # fmt: skip
    for name in commands:
        (tmp / name).mkdir()
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run_all(commands, tmp, ROOT, env, TIMEOUT)
    return {
        "cli": json.loads((tmp / "cli" / "report" / "report.json").read_text()),
        "single": json.loads((tmp / "single" / "rank0.json").read_text()),
        "ddp": [json.loads((tmp / "ddp" / f"rank{r}.json").read_text()) for r in range(2)],
    }


def test_simple_evaluate_on_two_ranks_equals_one_process(runs):
    single, (rank0, rank1) = runs["single"], runs["ddp"]
    assert (rank0["world_size"], rank1["world_size"], single["world_size"]) == (2, 2, 1)
    assert set(rank0["results"]) == set(TASKS)
    assert rank0["results"] == single["results"]  # every metric, exactly
    assert rank0["samples"] == single["samples"]  # every per-sample log-likelihood, greedy flag and generation
    assert "results" not in rank1  # lm-eval's simple_evaluate returns None where LOCAL_RANK != 0
    assert 0 < single["results"]["tiny_cloze"]["acc,none"] < 1  # not a trivial comparison


def test_every_rank_gets_every_result_in_order(runs):
    single = runs["single"]
    for rank in runs["ddp"]:
        assert rank["direct"] == single["direct"], rank["rank"]
        assert (rank["lm_rank"], rank["lm_world_size"]) == (0, 1)  # lm-eval's document sharding stays off
    assert any(text.strip() for text in single["direct"]["tiny_gen"])


def test_each_rank_scores_a_share(runs):
    single, ranks = runs["single"], runs["ddp"]
    for key in ("work", "simple_evaluate_work"):
        for rank in ranks:
            assert 0 < rank[key]["batches"] < single[key]["batches"], (key, rank["rank"])
        for field in ("batches", "rows", "tokens", "decode_steps"):
            assert sum(r[key][field] for r in ranks) == single[key][field], (key, field)


def test_a_failure_or_a_mismatch_raises_on_every_rank(runs):
    assert runs["single"]["errors"] == {"failure": [1, 2, 3, 4], "mismatch": [0]}  # one process: nothing to shard
    for rank in runs["ddp"]:
        failure = rank["errors"]["failure"]
        assert "rank 1 failed" in failure and "cannot be scored on rank 1" in failure
        assert "different requests" in rank["errors"]["mismatch"]


def test_evaluate_command_under_torchrun_writes_the_one_process_results(runs):
    """`torchrun -m lightning_llm evaluate --harness...` exits 0 (rank 1 used to fail: lm-eval returns no results
    there) and rank 0's report holds the one-process harness results (accuracies identical)."""
    part = runs["cli"]["parts"]["harness"]
    assert part["status"] == "ok", part.get("error")
    for task in ("tiny_cloze", "tiny_mc"):
        assert part["results"][task]["acc,none"] == runs["single"]["results"][task]["acc,none"], task
