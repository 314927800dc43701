"""Helpers shared by the benchmark scripts (imported as ``_common``: each script's folder is on ``sys.path``)."""

from __future__ import annotations

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (``"cuda"``, ``"cuda:1"`` or a ``torch.device``); no-op elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
