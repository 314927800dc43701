"""Worker for the 2-process gloo test (a plain module so that spawned children can import it)."""

from __future__ import annotations

import torch

# (rows of rank 0, rows of rank 1): deliberately uneven
SPLIT_ROWS = 2
SPLIT_INSTANCES = 17


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(6, 5, 11, generator=g) * 4
    target = torch.randint(11, (6, 5), generator=g)
    target[1, 3:] = -100
    num_bytes = torch.randint(1, 20, (6,), generator=g)
    lam_target = torch.full((6, 5), -100)
    lam_target[:, 3:] = torch.randint(11, (6, 2), generator=g)
    lam_target[::2, 4] = -100
    logits[0, 3, lam_target[0, 3]] += 30.0  # one greedy-correct example
    conf = torch.rand(45, generator=g, dtype=torch.float64)
    correct = (torch.rand(45, generator=g, dtype=torch.float64) < conf).long()
    return {
        "logits": logits,
        "target": target,
        "num_bytes": num_bytes,
        "lam_target": lam_target,
        "conf": conf,
        "correct": correct,
    }


def build_metrics() -> dict:
    from lightning_llm.metrics import (
        BitsPerByte,
        BrierScore,
        ExpectedCalibrationError,
        HELMCalibration,
        LambadaAccuracy,
        Perplexity,
    )

    return {
        "perplexity": Perplexity(ignore_index=-100),
        "bits_per_byte": BitsPerByte(ignore_index=-100),
        "lambada": LambadaAccuracy(),
        "helm": HELMCalibration(),
        "ece_l1": ExpectedCalibrationError(num_bins=10, norm="l1"),
        "ece_max": ExpectedCalibrationError(num_bins=10, norm="max"),
        "brier": BrierScore(),
    }


def update_all(metrics: dict, data: dict, rows: slice, instances: slice) -> None:
    metrics["perplexity"].update(data["logits"][rows], data["target"][rows])
    metrics["bits_per_byte"].update(data["logits"][rows], data["target"][rows], data["num_bytes"][rows])
    metrics["lambada"].update(data["logits"][rows], data["lam_target"][rows])
    for name in ("helm", "ece_l1", "ece_max", "brier"):
        metrics[name].update(data["conf"][instances], data["correct"][instances])


def run(rank: int, world_size: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        data = make_data()
        rows = slice(0, SPLIT_ROWS) if rank == 0 else slice(SPLIT_ROWS, None)
        instances = slice(0, SPLIT_INSTANCES) if rank == 0 else slice(SPLIT_INSTANCES, None)
        metrics = build_metrics()
        update_all(metrics, data, rows, instances)
        results = {name: metric.compute() for name, metric in metrics.items()}
        local = build_metrics()["perplexity"]
        local.update(data["logits"][rows], data["target"][rows])
        results["_local_count"] = metrics["perplexity"].count.clone()  # states are unsynced after compute
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()
