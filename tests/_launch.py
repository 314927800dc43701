"""Launching multi-process test runs: distinct free ports, one retry when another test takes a port first."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open together, so no two runs draw the same one)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_all(commands: dict[str, Sequence[str]], logs: Path, cwd: Path, env: dict[str, str], timeout: float) -> None:
    """Run the commands in parallel, each with its own ``MASTER_PORT`` and its output in ``logs/<name>.log``; a run
    that lost its port (EADDRINUSE) runs once more; assert every run exits 0 (the failure shows its log's tail)."""

    def start(name: str, port: int) -> tuple[subprocess.Popen, object]:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115
        run_env = {**os.environ, **env, "MASTER_PORT": str(port)}
        return subprocess.Popen(list(commands[name]), cwd=cwd, env=run_env, stdout=log, stderr=subprocess.STDOUT), log

    procs = {name: start(name, port) for name, port in zip(commands, free_ports(len(commands)))}
    for name, (proc, log) in procs.items():
        proc.wait(timeout=timeout)
        log.close()
        text = (logs / f"{name}.log").read_text()
        if proc.returncode != 0 and "EADDRINUSE" in text:  # another test's process took the port first
            proc, log = start(name, free_ports(1)[0])
            proc.wait(timeout=timeout)
            log.close()
            text = (logs / f"{name}.log").read_text()
        assert proc.returncode == 0, text[-4000:]
