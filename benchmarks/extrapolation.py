"""Train short, test long: runs ``notebooks/rope_vs_alibi_extrapolation.py`` as the README shows it and saves its table.

    python benchmarks/extrapolation.py --json benchmarks/results/extrapolation_cpu.json

The notebook trains three models identical but for ``pos_encoding`` (RoPE, ALiBi, learned) at a short context and
measures held-out perplexity at 1x..8x the training length, on the embedded corpus and on Tiny Shakespeare when
``../shared/data`` is present; it asserts its claim itself (ALiBi below RoPE at 4x and 8x). Here it runs in this
process (``runpy``, from the notebooks folder, with the notebook's full settings), and its ``results`` and
``timings`` become the JSON rows: one row per (data, encoding) with the perplexity at each length and the training
seconds, plus the whole run's wall time.
"""

from __future__ import annotations

import argparse
import os
import runpy
import time
from pathlib import Path

from _common import write_json

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "rope_vs_alibi_extrapolation.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the table (rows + machine + commit) here")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    cwd = os.getcwd()
    os.chdir(NOTEBOOK.parent)  # the notebook finds ../shared/data from its own folder, as when run there
    try:
        start = time.perf_counter()
        ns = runpy.run_path(str(NOTEBOOK), run_name="__main__")
        wall = time.perf_counter() - start
    finally:
        os.chdir(cwd)
    lengths = ns["EVAL_LENS"]
    rows = [
        {"data": data, "encoding": enc, **{f"ppl@{n}": round(curve[n], 4) for n in lengths},
         "train_s": round(ns["timings"][(data, enc)], 1)}
        for (data, enc), curve in ns["results"].items()
    ]  # fmt: skip
    print(f"wall time {wall:.1f} s; load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    write_json(
        args.json,
        rows,
        wall_s=round(wall, 1),
        train_length=ns["TRAIN_LEN"],
        eval_lengths=lengths,
        steps=ns["STEPS"],
        load_average_before=load_before,
    )


if __name__ == "__main__":
    main()
