"""2 gloo processes: synced metrics equal the single-process value when ranks hold uneven shares or nothing at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import _faults_dist_worker as worker  # noqa: E402
from _launch import free_ports  # noqa: E402

import lightning_llm.metrics  # noqa: E402, F401  (imported before forking)


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    """scenario -> metric -> [rank-0 value, rank-1 value], or the crash of the process group."""
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    out: dict = {}
    for scenario in worker.SCENARIOS:
        folder = tmp_path_factory.mktemp(f"faults_dist_{scenario}")
        crash = None
        try:
            mp.start_processes(
                worker.run,
                args=(2, free_ports(1)[0], str(folder), scenario),
                nprocs=2,
                join=True,
                start_method=start_method,
            )
        except mp.ProcessExitedException as err:  # e.g. gloo aborts on a collective mismatch
            crash = str(err)
        out[scenario] = {
            name: torch.load(folder / f"{name}.pt", weights_only=False)  # written by this test's own worker
            if (folder / f"{name}.pt").exists()
            else f"the 2-process run crashed before {name} was synced: {crash}"
            for name in ("perplexity", "lambada", "helm")
        }
    return out


@pytest.fixture(scope="module")
def single():
    metrics = worker.build_metrics()
    worker.update(metrics, worker.make_data(), slice(None), slice(None), None)
    return {name: metric.compute() for name, metric in metrics.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", list(worker.SCENARIOS))
@pytest.mark.parametrize("name", ["perplexity", "lambada", "helm"])
def test_synced_value_equals_single_process(synced, single, scenario, name):
    values = synced[scenario][name]
    assert not isinstance(values, str), values
    for rank, got in enumerate(values):
        want = single[name]
        assert not isinstance(got, str), f"rank {rank} failed to compute {name} in {scenario}: {got}"
        if isinstance(want, dict):
            assert set(got) == set(want)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, msg=f"{name}/{key}")
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scenarios_are_what_they_claim():
    data = worker.make_data()
    assert (data["lam_target"] != -100).any(dim=1).all()
    for scenario, (_, _, empty) in worker.SCENARIOS.items():
        shares = [worker.shares(scenario, rank) for rank in (0, 1)]
        sizes = [len(range(*r.indices(worker.N_ROWS))) for r, _ in shares]
        assert sum(sizes) == worker.N_ROWS
        if empty is None:  # uneven: both ranks hold data, in different amounts
            assert min(sizes) > 0 and sizes[0] != sizes[1]
        else:  # one rank holds nothing
            assert 0 in sizes
