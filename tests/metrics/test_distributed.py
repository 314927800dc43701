"""2-process gloo: every metric's synced value equals the single-process value on the union of the data."""

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import _dist_worker  # noqa: E402
from _launch import free_ports  # noqa: E402

import lightning_llm.metrics  # noqa: E402, F401  (imported before forking)


@pytest.fixture(scope="module")
def synced_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    # torch.multiprocessing's spawn API; "fork" reuses the parent's imports (spawn re-imports torchmetrics: ~18 s).
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _dist_worker.run, args=(2, free_ports(1)[0], str(out)), nprocs=2, join=True, start_method=start_method
    )
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single_results():
    data = _dist_worker.make_data()
    metrics = _dist_worker.build_metrics()
    _dist_worker.update_all(metrics, data, slice(None), slice(None))
    return {name: metric.compute() for name, metric in metrics.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["perplexity", "bits_per_byte", "lambada", "helm", "ece_l1", "ece_max", "brier"])
def test_synced_equals_single_process(synced_results, single_results, name):
    synced, single = synced_results[name], single_results[name]
    if isinstance(single, dict):
        assert set(synced) == set(single)
        for key in single:
            torch.testing.assert_close(synced[key], single[key], rtol=1e-12, atol=1e-12, msg=f"{name}/{key}")
    else:
        torch.testing.assert_close(synced, single, rtol=1e-12, atol=1e-12)


@pytest.mark.distributed
def test_states_are_unsynced_after_compute(synced_results):
    # rank 0 scored 2 rows of 5 tokens with 2 ignored: its local count is 8, not the global 28
    assert synced_results["_local_count"].item() == 8
