"""Helpers shared by the benchmark scripts (imported as ``_common``: each script's folder is on ``sys.path``)."""

from __future__ import annotations

import time

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (``"cuda"``, ``"cuda:1"`` or a ``torch.device``); no-op elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def token_rows_dataset(tokens: torch.Tensor) -> torch.utils.data.Dataset:
    """Rows of ``tokens (N, T + 1)`` as causal-LM batches ``{"input_ids": row[:-1], "targets": row[1:]}``."""

    class TokenRows(torch.utils.data.TensorDataset):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            row = self.tensors[0][i]
            return {"input_ids": row[:-1], "targets": row[1:]}

    return TokenRows(tokens)


def step_probe():
    """A Lightning callback recording each step's rank-averaged loss and end time, and (once) the rank's parameter +
    optimizer-state bytes (:func:`lightning_llm.parallel.sharded_state_bytes`) as ``bytes``."""
    from lightning.pytorch.callbacks import Callback

    from lightning_llm.parallel import sharded_state_bytes

    class StepProbe(Callback):
        def __init__(self) -> None:
            self.times, self.losses, self.bytes = [], [], None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")))
            self.times.append(time.perf_counter())
            if self.bytes is None:
                self.bytes = sharded_state_bytes(pl_module, trainer.optimizers[0])

    return StepProbe()


def machine_info(device: str | torch.device = "cpu") -> dict[str, object]:
    """Where and at which commit a benchmark ran: CPU model, cores, torch threads, load average, torch / Python
    versions, the device (GPU name when CUDA), and the git commit with a ``+dirty`` mark for uncommitted changes."""
    import os
    import platform
    import subprocess
    from pathlib import Path

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    device = torch.device(device)
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "commit": commit,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | None, rows: list[dict] | dict, device: str | torch.device = "cpu", **extra: object) -> None:
    """Write a benchmark's results to ``path`` (nothing when None): ``{"rows": rows, "machine": machine_info(), ...}``,
    ``rows`` being the printed table as row objects with the same column names."""
    if path is None:
        return
    import json
    from pathlib import Path

    payload = {"rows": rows, "machine": machine_info(device), **extra}
    Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"written to {path}")
