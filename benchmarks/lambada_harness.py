"""LAMBADA evaluation time: lightning_llm vs lm-evaluation-harness on the same Hugging Face model and passages.

    python benchmarks/lambada_harness.py                       # the first 500 passages of OpenAI's LAMBADA test set
    python benchmarks/lambada_harness.py --n 100 --threads 1   # quicker; one thread is steadier on a loaded machine
    python benchmarks/lambada_harness.py --device cuda --data PATH/lambada_test.jsonl

The model is built here, offline: a byte-level BPE (``Tokenizer.train_bpe``, ``--vocab`` tokens) trained on the
embedded corpus, ``tinyshakespeare.txt`` and the LAMBADA passages *after* the benchmarked ones, and a GPT-2-shaped
``transformers.GPT2LMHeadModel`` (``--layers``, ``--width``, 1024 positions) with random weights (GPT-2 init), or
briefly trained with ``--train-steps`` (a few hundred steps do not make LAMBADA's accuracy non-zero; the exact-accuracy
check on a model that gets some targets right is ``tests/metrics/harness_parity``). Both saved with ``save_pretrained`` to a temporary
directory, which both sides load.

* harness: ``lm_eval.models.huggingface.HFLM(pretrained=dir, batch_size=B).loglikelihood`` on the ``lambada_openai``
  requests (context = all words but the last, target = ``" " + last word``); ``acc`` = mean is_greedy,
  ``ppl`` = ``lm_eval.api.metrics.perplexity`` of the log-likelihoods. Timed: ``loglikelihood`` (tokenizing,
  sorting, batching, scoring); the model load in ``HFLM(...)`` is not timed.
* ours: ``LambadaDataModule`` + ``CausalLM(pretrained=dir, eval_task="lambada")`` through ``Trainer.test``, the path
  of ``lightning-llm test --config configs/eval/lambada.yaml``: the directory is read by
  :func:`lightning_llm.load_pretrained` into our :class:`~lightning_llm.nn.transformer.Transformer` with the same
  weights. Timed: tokenizing (``setup``) and ``Trainer.test``; the model load (``configure_model``) is not timed.

Runs are interleaved (harness, ours, harness, ours, ...) and the minimum wall time over ``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import sync, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LAMBADA = SHARED / "lambada_test.jsonl"


def read_lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def build_model(
    directory: Path, heldout_texts: list[str], vocab: int, layers: int, width: int, train_steps: int
) -> Path:
    """Trains the tokenizer, builds (and briefly trains) the GPT-2-shaped model, saves both to ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_llm.data.corpus import embedded_documents
    from lightning_llm.data.tokenizer import Tokenizer

    docs = embedded_documents() + heldout_texts
    if (SHARED / "tinyshakespeare.txt").is_file():
        docs.append((SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    tok = Tokenizer.train_bpe(docs, vocab_size=vocab)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=1024,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    model = GPT2LMHeadModel(config)
    if train_steps:
        stream = torch.tensor([i for t in heldout_texts[:2000] for i in [*tok.encode(t), tok.eos_id]])
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(train_steps):
            starts = torch.randint(0, stream.numel() - 129, (8,), generator=g).tolist()
            batch = torch.stack([stream[s : s + 128] for s in starts])  # (8, 128)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


class Harness:
    """lm-evaluation-harness's HFLM on the ``lambada_openai`` requests."""

    def __init__(self, model_dir: Path, texts: list[str], batch_size: int, device: str) -> None:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        self.lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device=device)
        self.requests = []
        for i, text in enumerate(texts):
            context, target = " ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1]
            self.requests.append(
                Instance(request_type="loglikelihood", doc={"text": text}, arguments=(context, target), idx=i)
            )

    def run(self, device: str) -> tuple[float, dict[str, float]]:
        from lm_eval.api.metrics import mean, perplexity

        sync(device)
        t0 = time.perf_counter()
        results = self.lm.loglikelihood(self.requests, disable_tqdm=True)
        sync(device)
        seconds = time.perf_counter() - t0
        return seconds, {"acc": mean([float(g) for _, g in results]), "ppl": perplexity([ll for ll, _ in results])}


class Ours:
    """``LambadaDataModule`` + ``CausalLM(eval_task="lambada")`` through ``Trainer.test``."""

    def __init__(self, model_dir: Path, jsonl: Path, batch_size: int, device: str) -> None:
        from lightning_llm.modules.causal_lm import CausalLM

        self.model_dir, self.jsonl, self.batch_size, self.device = model_dir, jsonl, batch_size, device
        self.model = CausalLM(pretrained=str(model_dir), eval_task="lambada")  # read by load_pretrained
        self.model.configure_model()  # the load is not timed (as HFLM's)

    def run(self, device: str) -> tuple[float, dict[str, float]]:
        import lightning as L

        from lightning_llm.data.lambada import LambadaDataModule

        trainer = L.Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        sync(device)
        t0 = time.perf_counter()
        dm = LambadaDataModule(path=str(self.jsonl), tokenizer=str(self.model_dir), batch_size=self.batch_size)
        (out,) = trainer.test(self.model, datamodule=dm, verbose=False)
        sync(device)
        seconds = time.perf_counter() - t0
        return seconds, {"acc": float(out["test/lambada_acc"]), "ppl": float(out["test/lambada_ppl"])}


def lambada_benchmark(
    n: int = 500,
    batch_size: int = 16,
    vocab: int = 32000,
    layers: int = 4,
    width: int = 256,
    train_steps: int = 0,
    repeats: int = 2,
    device: str = "cpu",
    data: str | Path = LAMBADA,
) -> list[dict] | None:
    """Times both sides, prints the table; returns its rows (None when lm_eval or the data file is missing)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("LAMBADA vs lm-evaluation-harness: skipped (lm_eval not installed: pip install lm-eval)")
        return None
    data = Path(data)
    if not data.is_file():
        print(f"LAMBADA vs lm-evaluation-harness: skipped ({data} not present; pass --data PATH/lambada_test.jsonl)")
        return None
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lm_eval", "transformers"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    lines = read_lines(data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "lambada.jsonl"
        jsonl.write_text("".join(lines[:n]), encoding="utf-8")
        texts = [json.loads(line)["text"] for line in lines[:n]]
        heldout = [json.loads(line)["text"] for line in lines[n:]]
        t0 = time.perf_counter()
        model_dir = build_model(tmp / "model", heldout, vocab, layers, width, train_steps)
        build_s = time.perf_counter() - t0
        sides = {
            "harness (HFLM)": Harness(model_dir, texts, batch_size, device),
            "ours (Trainer.test)": Ours(model_dir, jsonl, batch_size, device),
        }
        for side in sides.values():  # warm-up (first-call costs: lazy imports, allocator)
            side.run(device)
        times: dict[str, list[float]] = {k: [] for k in sides}
        numbers: dict[str, dict[str, float]] = {}
        for _ in range(repeats):
            for name, side in sides.items():
                seconds, numbers[name] = side.run(device)
                times[name].append(seconds)
    vocab_size = sides["ours (Trainer.test)"].model.vocab_size
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(
        f"\nLAMBADA ({n} passages of {data.name}), GPT-2 shape {layers} layers x {width}, vocab {vocab_size}, "
        f"batch {batch_size}, {device} ({dev}), torch {torch.__version__}; model built in {build_s:.0f} s"
    )
    header = f"{'implementation':>26} | {'min s':>7} | {'median s':>8} | {'acc':>8} | {'ppl':>12} | {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    base = min(times["harness (HFLM)"])
    ref = numbers["harness (HFLM)"]
    rows = []
    for name in sides:
        t = sorted(times[name])
        row = {"impl": name, "min_s": t[0], "median_s": t[len(t) // 2], **numbers[name], "speedup": base / t[0]}
        rows.append(row)
        print(
            f"{name:>26} | {row['min_s']:7.2f} | {row['median_s']:8.2f} | {row['acc']:8.4f} | {row['ppl']:12.4f} | "
            f"{row['speedup']:7.2f}x"
        )
    for row in rows[1:]:
        same_acc = round(row["acc"] * n) == round(ref["acc"] * n)
        rel = abs(row["ppl"] - ref["ppl"]) / ref["ppl"]
        print(f"  {row['impl']}: acc identical: {same_acc}; ppl relative difference {rel:.2e} (goal <= 1e-4)")
    print("speed-up = harness min wall time / this min wall time (goal >= 2x); model loading excluded on both sides.")
    assert all(math.isfinite(r["ppl"]) for r in rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="first N passages")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=str(LAMBADA), help="OpenAI's lambada_test.jsonl (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the table (row objects), machine and commit here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = lambada_benchmark(
        args.n,
        args.batch_size,
        args.vocab,
        args.layers,
        args.width,
        args.train_steps,
        args.repeats,
        args.device,
        data=args.data,
    )
    if rows is not None:
        write_json(args.json, rows, args.device, args=vars(args))


if __name__ == "__main__":
    main()
