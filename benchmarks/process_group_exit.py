"""How often a 2-process gloo run that succeeded dies at exit, with the group left up vs ended (``lightning_llm._dist``).

    python benchmarks/process_group_exit.py [--runs 20] [--json PATH]

Each run launches ``torchrun --standalone --nproc-per-node 2`` on a script that initialises a gloo group, runs an
``all_gather_object`` and an ``all_reduce`` (checked), and exits. Two variants, alternated run by run:

* **left up**: the script exits with the group still initialised, as a script with Lightning's ``DDPStrategy`` on
  CPU does (Lightning destroys the group at exit for NCCL only);
* **ended_at_exit**: the group is created inside :func:`lightning_llm._dist.ended_at_exit`, as HarnessLM and our
  strategies create theirs, so ``atexit`` destroys it while the interpreter is whole.

A run fails when torchrun exits non-zero; ``aborts`` counts the runs where a rank died of SIGABRT ("terminate called
without an active exception" during interpreter finalization). The count is random from run to run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from lightning_llm._dist import ended_at_exit

    if sys.argv[1] == "ended_at_exit":
        with ended_at_exit():
            dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo")
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, ("x" * 1000, dist.get_rank()))
    t = torch.ones(10)
    dist.all_reduce(t)
    assert t[0].item() == dist.get_world_size()
    """
)
VARIANTS = ("left up", "ended_at_exit")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="launches per variant")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    counts = {v: {"runs": 0, "failed": 0, "aborts": 0} for v in VARIANTS}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "exit_after_collective.py"
        script.write_text(SCRIPT)
        for _ in range(args.runs):
            for variant in VARIANTS:
                arg = "ended_at_exit" if variant == "ended_at_exit" else "left_up"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       str(script), arg]  # fmt: skip
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                c = counts[variant]
                c["runs"] += 1
                c["failed"] += proc.returncode != 0
                c["aborts"] += "SIGABRT" in proc.stdout + proc.stderr
    rows = [{"variant": v, **counts[v]} for v in VARIANTS]
    print(f"{'variant':<15} {'runs':>5} {'failed':>7} {'aborts':>7}")
    for r in rows:
        print(f"{r['variant']:<15} {r['runs']:>5} {r['failed']:>7} {r['aborts']:>7}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
