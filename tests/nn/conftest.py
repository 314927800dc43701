"""Fixtures for the pure-torch model tests.

The models here are tiny: one intra-op thread is as fast as two, and on a loaded 2-core machine several OpenMP
threads per process spin against each other (measured: a 37-step overfit took 0.6 s with 1 thread, 23 s with 2).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
