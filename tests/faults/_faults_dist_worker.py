"""Worker of the 2-process gloo metric test (a plain module, so that the forked children can import it).

Each scenario gives rank 0 and rank 1 a different share of the same data, including an empty share (a rank that never
calls ``update``, or calls it with zero rows). The synced value must equal one process's value on all the data.
"""

from __future__ import annotations

import torch

N_ROWS = 7  # token-level rows (Perplexity, LambadaAccuracy)
N_INSTANCES = 40  # calibration instances (HELMCalibration)

#: scenario -> (rank-0 rows, rank-0 instances, how the empty rank behaves); rank 1 gets the rest
SCENARIOS = {
    "uneven": (1, 29, None),
    "rank0-no-update": (0, 0, "skip"),
    "rank0-empty-update": (0, 0, "empty"),
    "rank1-no-update": (N_ROWS, N_INSTANCES, "skip"),
}


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    logits = torch.randn(N_ROWS, 6, 13, generator=g, dtype=torch.float64) * 3
    target = torch.randint(13, (N_ROWS, 6), generator=g)
    target[2, 4:] = -100
    lam_target = torch.full((N_ROWS, 6), -100)
    lam_target[:, 4:] = torch.randint(13, (N_ROWS, 2), generator=g)
    logits[0, 4, lam_target[0, 4]] += 40.0  # a greedy-correct example
    logits[3, 4, lam_target[3, 4]] += 40.0
    logits[3, 5, lam_target[3, 5]] += 40.0
    conf = torch.rand(N_INSTANCES, generator=g, dtype=torch.float64)
    correct = (torch.rand(N_INSTANCES, generator=g, dtype=torch.float64) < conf).long()
    return {"logits": logits, "target": target, "lam_target": lam_target, "conf": conf, "correct": correct}


def build_metrics() -> dict:
    from lightning_llm.metrics import HELMCalibration, LambadaAccuracy, Perplexity

    return {"perplexity": Perplexity(ignore_index=-100), "lambada": LambadaAccuracy(), "helm": HELMCalibration()}


def update(metrics: dict, data: dict, rows: slice, instances: slice, empty: str | None) -> None:
    n_rows = len(range(*rows.indices(N_ROWS)))
    if n_rows or empty == "empty":
        if "perplexity" in metrics:
            metrics["perplexity"].update(data["logits"][rows], data["target"][rows])
        if "lambada" in metrics:
            metrics["lambada"].update(data["logits"][rows], data["lam_target"][rows])
    if (len(range(*instances.indices(N_INSTANCES))) or empty == "empty") and "helm" in metrics:
        metrics["helm"].update(data["conf"][instances], data["correct"][instances])


def shares(scenario: str, rank: int) -> tuple[slice, slice]:
    rows, instances, _ = SCENARIOS[scenario]
    return (slice(0, rows), slice(0, instances)) if rank == 0 else (slice(rows, None), slice(instances, None))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def run(rank: int, world_size: int, port: int, out_dir: str, scenario: str) -> None:
    """One scenario; after each metric, rank 0 writes ``<out_dir>/<metric>.pt`` with every rank's value (so a crash in
    a later metric's synchronisation keeps the earlier results)."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        data = make_data()
        metrics = build_metrics()
        rows, instances = shares(scenario, rank)
        update(metrics, data, rows, instances, SCENARIOS[scenario][2])
        for name, metric in metrics.items():
            try:
                value = _plain(metric.compute())
            except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
                value = f"{type(err).__name__}: {err}"
            gathered = [None] * world_size
            dist.all_gather_object(gathered, value)
            if rank == 0:
                torch.save(gathered, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()
