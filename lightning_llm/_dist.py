"""Ending a torch.distributed process group before the interpreter does (plain torch, no Lightning).

A process that exits with a gloo process group still initialised can die with SIGABRT ("terminate called without
an active exception"): gloo's C++ worker threads, or pending work holding tensors, are torn down during interpreter
finalization, after Python has stopped (https://github.com/pytorch/pytorch/issues/190489). It is intermittent: it
depends on where those threads are when the process ends: a 2-process ``lightning-llm evaluate`` under torchrun
passed locally many times in a row and aborted on rank 0 in one CI run. Lightning destroys the groups it creates
only for NCCL (``atexit`` in ``lightning.fabric.utilities.distributed``), so the gloo groups of CPU runs stay up.

The rule here: whoever creates a group ends it. Code of ours that may create one runs under
:func:`ended_at_exit`, which registers :func:`destroy_process_group` with ``atexit`` when a group appeared inside
it: :class:`~lightning_llm.evaluation.HarnessLM` under ``torchrun``, and the ``setup_environment`` of
:class:`~lightning_llm.parallel.presets.FSDP2Strategy` and :class:`~lightning_llm.parallel.presets.PipelineStrategy`
(Lightning's own strategies, plain DDP included, keep Lightning's behaviour). The ``lightning-llm`` program
(:func:`lightning_llm.cli.main`) destroys, when it returns, a group that was not there when it started, whichever
strategy made it. ``atexit`` handlers run while the interpreter is still whole, before finalization.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def process_group_initialized() -> bool:
    """Whether a default torch.distributed process group exists in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def destroy_process_group() -> None:
    """Destroy the default process group (and every group made from it) if there is one; otherwise nothing.

    Not a collective, but it waits for this process's pending asynchronous work, which ends when the peers join it
    or leave. Measured (2 gloo ranks, torch 2.13): rank 0 raising with an all-reduce that rank 1 never joins, while
    rank 1 waits in a ``recv`` from rank 0, ends after the group's timeout with or without this call. Safe to call
    twice and from ``atexit``."""
    if process_group_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def ended_at_exit() -> Iterator[None]:
    """Run the block; if it created the default process group (none before, one after), destroy that group at
    interpreter exit (:func:`destroy_process_group` registered with ``atexit``)."""
    existed = process_group_initialized()
    yield
    if not existed and process_group_initialized():
        atexit.register(destroy_process_group)
