"""Worker of ``test_harness_distributed.py``: HarnessLM on the tiny local tasks, in one process or under torchrun.

Run as ``python _harness_dist_worker.py MODEL_DIR TASK_DIR OUT_DIR`` (one process) or
``python -m torch.distributed.run --standalone --nproc-per-node 2 _harness_dist_worker.py MODEL_DIR TASK_DIR OUT_DIR``
(HarnessLM initialises the gloo process group itself from torchrun's environment). Every rank writes
``OUT_DIR/rank{r}.json``: the outputs of direct ``loglikelihood`` / ``loglikelihood_rolling`` / ``generate_until``
calls on the harness's own request instances of every task, what the rank computed (``HarnessLM.work``), where
``simple_evaluate`` returns them (``LOCAL_RANK`` 0) its results and per-sample responses, and what a failure on one
rank and requests that differ between ranks give (``errors``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if len(sys.argv) > 3:  # a datasets cache per process: concurrent first loads of the same .jsonl cannot collide
    os.environ["HF_DATASETS_CACHE"] = str(Path(sys.argv[3]) / f"datasets_cache_rank{os.environ.get('RANK', '0')}")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TASKS = ["tiny_cloze", "tiny_mc", "tiny_mc_long", "tiny_rolling", "tiny_gen"]


def main(model_dir: str, task_dir: str, out_dir: str) -> None:
    import lm_eval
    import torch.distributed as dist
    from lm_eval.tasks import TaskManager, get_task_dict

    from lightning_llm.evaluation import HarnessLM

    torch.set_num_threads(1)
    lm = HarnessLM(model_dir, batch_size=3, device="cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    record: dict = {"rank": rank, "world_size": world, "lm_rank": lm.rank, "lm_world_size": lm.world_size}
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0)
    record["simple_evaluate_work"] = dict(lm.work)
    if res is not None:
        record["results"] = {t: {k: v for k, v in res["results"][t].items() if isinstance(v, (int, float))}
                             for t in TASKS}  # fmt: skip
        record["samples"] = {
            t: [s["resps"] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])] for t in TASKS
        }
    direct = {}
    for task in TASKS:
        obj = get_task_dict([task], TaskManager(include_path=task_dir, include_defaults=False))[task]
        obj.build_all_requests(rank=0, world_size=1)
        kind = obj.instances[0].request_type
        direct[task] = getattr(lm, kind)(obj.instances)
    record["direct"] = direct
    record["work"] = dict(lm.work)

    def fails_on_rank_1(unit: int) -> int:
        if rank == 1:
            raise ValueError(f"unit {unit} cannot be scored on rank 1")
        return unit

    record["errors"] = {}
    for name, call in {
        "failure": lambda: lm._map([1, 2, 3, 4], [1.0] * 4, fails_on_rank_1),  # rank 1 owns two of the units
        "mismatch": lambda: lm._map([rank], [1.0], lambda unit: unit),  # each rank hands in different units
    }.items():
        try:
            record["errors"][name] = call()
        except RuntimeError as err:
            record["errors"][name] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
