"""lm-evaluation-harness wall time: our ``HarnessLM`` vs the harness's own ``HFLM``, same model, same local tasks.

    python benchmarks/harness.py                         # 300 LAMBADA passages, 3 task kinds, CPU
    python benchmarks/harness.py --n 100 --threads 1     # quicker
    python benchmarks/harness.py --device cuda --n 2000 --batch-size 64 --json out.json
    python benchmarks/harness.py --kinds generate_until --gen-modes compiled   # only HarnessLM(compile=True)

The model is built here, offline, with ``benchmarks/lambada_harness.py``'s builder: a byte-level BPE (``--vocab``)
trained on the embedded corpus, tinyshakespeare and the LAMBADA passages after the benchmarked ones, and a
GPT-2-shaped ``transformers.GPT2LMHeadModel`` (``--layers`` x ``--width``, 1024 positions, random weights), saved with
``save_pretrained``. Both sides read that directory: ``HFLM(pretrained=dir)`` and ``HarnessLM(dir)`` (converted by
``load_pretrained`` into our Transformer).

Tasks are local YAML files over a local .jsonl (no network), written to a temporary folder:

* ``bench_lambada``: ``lambada_openai``'s definition (``loglikelihood``; acc, perplexity) on the first ``--n`` passages
  of ``../shared/data/lambada_test.jsonl``;
* ``bench_lambada3``: the same on the first ``--n-mc`` passages with 3 few-shot examples taken by the harness's
  ``first_n`` sampler (as MMLU-style tasks take them: the same examples before every question but the first few,
  whose own document is left out): inputs that begin alike, whose shared beginning HarnessLM runs once;
* ``bench_mc``: a HellaSwag-shaped ``multiple_choice`` task (``loglikelihood`` requests) on the first ``--n-mc``
  passages: the passage but its last 10 words is the context, and the choices are those 10 words and the last 10
  of three other passages (4 multi-token endings per context: HarnessLM runs each context once);
* ``bench_rolling``: ``loglikelihood_rolling`` over the same passages joined 8 at a time (word/byte perplexity);
* ``bench_gen_N``: ``generate_until`` of ``N`` tokens after the first half of ``--n-gen`` passages, stopping
  at a newline; timed once per ``--gen-modes`` entry: HarnessLM's eager decode step (the default,
  ``compile=False``) and its compiled one (a second ``HarnessLM(compile=True)`` on the same directory);
* ``bench_gen3_N``: the same with ``bench_lambada3``'s 3 ``first_n`` few-shot examples, for the first
  ``--gen-tokens`` value: prompts that begin alike, whose shared beginning HarnessLM's prefill runs once
  (``lightning_llm.nn.generation.prefill``).

Timed, per task kind: the model calls alone (``lm.loglikelihood(instances)`` etc. on the harness's own request
instances, built once: tokenizing, batching, scoring) and the whole ``lm_eval.simple_evaluate`` (adds building the
dataset, the requests and the metrics, the same for both sides); model loading is not timed. Runs alternate (HFLM,
ours, HFLM, ours...) and the minimum over ``--repeats`` is reported, with the results of both, which must agree
(accuracies equal, log-likelihood metrics to 1e-4 relative, every per-request output too). The minimum leaves out
the warm-up, which the first ``simple_evaluate`` of each side pays: it is reported on its own ("first run"). For a
compiled row that warm-up includes compiling HarnessLM's decode step, once per batch size (tens of seconds on a CPU;
every prompt width and generation length reuses the graph, so only the first compiled row pays it); the other
columns are then the compiled steady state.

The model calls are timed twice: wall-clock, and the CPU time of this process (``time.process_time``, all threads).
On a shared machine the wall time of a multi-threaded run also measures the other users (a thread that waits for a
busy core stalls every parallel region); with ``--threads 1`` the CPU time does not, so its ratio is the steadier
one there. The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sync, write_json  # noqa: E402
from lambada_harness import LAMBADA, build_model, read_lines  # noqa: E402

TASKS = {
    "loglikelihood": "bench_lambada",
    "loglikelihood_3shot": "bench_lambada3",  # the first --n-mc passages, 3 first_n examples before each
    "multiple_choice": "bench_mc",  # loglikelihood requests: 4 multi-token endings per context
    "loglikelihood_rolling": "bench_rolling",
    "generate_until": "bench_gen_{n}",  # one task per --gen-tokens value
    "generate_until_3shot": "bench_gen3_{n}",  # the first --gen-tokens value only
}
#: the LM method a task kind calls (default: the kind itself)
METHOD = {
    "multiple_choice": "loglikelihood",
    "loglikelihood_3shot": "loglikelihood",
    "generate_until_3shot": "generate_until",
}
GENERATE = ("generate_until", "generate_until_3shot")
FEWSHOT = "num_fewshot: 3\nfewshot_split: test\nfewshot_config:\n  sampler: first_n\n"  # the 3-shot tasks' examples


def write_tasks(folder: Path, passages: list[str], n_gen: int, gen_tokens: list[int], n_mc: int = 100) -> Path:
    """The local task YAMLs and their .jsonl files in ``folder``."""

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    lam = jsonl("lambada", [{"text": t} for t in passages])
    docs = jsonl("docs", [{"text": " ".join(passages[i : i + 8])} for i in range(0, len(passages), 8)])
    gen = []
    for t in passages[:n_gen]:
        words = t.split(" ")
        gen.append({"prompt": " ".join(words[: len(words) // 2]), "answer": " ".join(words[len(words) // 2 :])})
    gen_path = jsonl("gen", gen)
    mc = []  # HellaSwag-shaped: a context, its own next 10 words and those of 3 other passages as the endings
    for i, t in enumerate(passages[:n_mc]):
        words = t.split(" ")
        cut = max(1, len(words) - 10)
        endings = [" ".join(words[cut:])]
        for j in (1, 2, 3):
            other = passages[(i + 7 * j) % len(passages)].split(" ")
            endings.append(" ".join(other[-10:]))
        order = [(i + j) % 4 for j in range(4)]  # the right ending moves around
        mc.append({"context": " ".join(words[:cut]), "endings": [endings[k] for k in order], "label": order.index(0)})
    mc_path = jsonl("mc", mc)
    common = (
        "output_type: {kind}\ntest_split: test\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    )
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\n"
        + common.format(kind="multiple_choice", path=mc_path)
        + 'doc_to_text: "{{context}}"\ndoc_to_target: label\ndoc_to_choice: "{{endings}}"\n'
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    cloze = (
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        + "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        + "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        + "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "bench_lambada.yaml").write_text(
        "task: bench_lambada\n" + common.format(kind="loglikelihood", path=lam) + cloze
    )
    lam_few = jsonl("lambada_fewshot", [{"text": t} for t in passages[:n_mc]])
    (folder / "bench_lambada3.yaml").write_text(
        "task: bench_lambada3\n" + common.format(kind="loglikelihood", path=lam_few) + cloze + FEWSHOT
    )
    (folder / "bench_rolling.yaml").write_text(
        "task: bench_rolling\n"
        + common.format(kind="loglikelihood_rolling", path=docs)
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    for n in gen_tokens:  # one task per generation length
        gen_task = (
            common.format(kind="generate_until", path=gen_path)
            + 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{\' \' + answer}}"\n'
            + f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {n}\n  do_sample: false\n'
            + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        )
        (folder / f"bench_gen_{n}.yaml").write_text(f"task: bench_gen_{n}\n" + gen_task)
        (folder / f"bench_gen3_{n}.yaml").write_text(f"task: bench_gen3_{n}\n" + gen_task + FEWSHOT)
    return folder


def run(lm, task: str, folder: Path, device: str) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    sync(device)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=False)
    sync(device)
    seconds = time.perf_counter() - t0
    metrics = {k.split(",")[0]: float(v) for k, v in res["results"][task].items() if isinstance(v, (int, float))}
    metrics.pop("sample_len", None)
    return seconds, metrics


def build_requests(task: str, folder: Path) -> list:
    """The harness's own request instances of ``task`` (built once; what ``simple_evaluate`` hands the model)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    obj = get_task_dict([task], TaskManager(include_path=str(folder), include_defaults=False))[task]
    obj.build_all_requests(rank=0, world_size=1)
    return obj.instances


def run_requests(lm, kind: str, instances: list, device: str) -> tuple[float, float, list]:
    """``(wall seconds, CPU seconds of this process, outputs)`` of one model call on the instances."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = getattr(lm, METHOD.get(kind, kind))(instances, disable_tqdm=True)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def same_outputs(a: list, b: list) -> bool:
    """Per-request outputs equal: strings exactly, is_greedy exactly, log-likelihoods to 1e-4."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, str):
            if x != y:
                return False
            continue
        xs, ys = (x if isinstance(x, tuple) else (x,)), (y if isinstance(y, tuple) else (y,))
        if abs(xs[0] - ys[0]) > 1e-4 * max(1.0, abs(xs[0])) or xs[1:] != ys[1:]:
            return False
    return True


def agree(a: dict, b: dict) -> bool:
    for key, value in a.items():
        if key.startswith(("acc", "exact_match")):
            if b[key] != value:
                return False
        elif not math.isclose(b[key], value, rel_tol=1e-4):
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="LAMBADA passages")
    p.add_argument("--n-gen", type=int, default=32, help="passages of the generation task")
    p.add_argument("--n-mc", type=int, default=100, help="questions (4 endings each) of the multiple-choice task")
    p.add_argument("--gen-tokens", default="16,256",
                   help="comma-separated generation lengths, one generate_until row each (the harness's default "
                        "max_gen_toks is 256; 16 tokens is mostly the prompts' prefill)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kinds", default=",".join(TASKS), help="comma-separated task kinds to time")
    p.add_argument("--gen-modes", default="eager,compiled",
                   help="comma-separated HarnessLM decode steps for the generate_until rows: eager (compile=False, "
                        "the default) and/or compiled (compile=True), a row each")  # fmt: skip
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from lm_eval.models.huggingface import HFLM

    from lightning_llm.evaluation import HarnessLM

    lines = [json.loads(x)["text"] for x in read_lines(LAMBADA)]
    passages, heldout = lines[: args.n], lines[args.n :]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model_dir = build_model(tmp / "model", heldout, args.vocab, args.layers, args.width, 0)
        gen_tokens = [int(n) for n in args.gen_tokens.split(",")]
        folder = write_tasks(tmp, passages, args.n_gen, gen_tokens, args.n_mc)
        print(f"model + tokenizer built in {time.perf_counter() - t0:.1f}s; device {args.device}, "
              f"threads {torch.get_num_threads()}; load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
        hflm = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device=args.device)
        kinds, modes = args.kinds.split(","), args.gen_modes.split(",")
        if not set(modes) <= {"eager", "compiled"}:
            p.error(f"--gen-modes takes eager and/or compiled, got {args.gen_modes!r}")
        harness_lms = {"eager": HarnessLM(str(model_dir), batch_size=args.batch_size, device=args.device)}
        if set(GENERATE) & set(kinds) and "compiled" in modes:
            harness_lms["compiled"] = HarnessLM(str(model_dir), batch_size=args.batch_size, device=args.device,
                                                compile=True)  # fmt: skip
        rows = []
        runs = [
            (kind, n, mode)
            for kind in kinds
            for n in {"generate_until": gen_tokens, "generate_until_3shot": gen_tokens[:1]}.get(kind, [None])
            for mode in (modes if kind in GENERATE else ["eager"])
        ]
        for kind, n, mode in runs:
            ours = harness_lms[mode]
            task = TASKS[kind].format(n=n)
            best = {"HFLM": math.inf, "HarnessLM": math.inf}
            first = {}  # the first simple_evaluate of each side: warm-up (and compilation) included
            results = {}
            for _ in range(args.repeats):
                for name, lm in (("HFLM", hflm), ("HarnessLM", ours)):
                    seconds, metrics = run(lm, task, folder, args.device)
                    best[name] = min(best[name], seconds)
                    first.setdefault(name, seconds)
                    results[name] = metrics
            same = agree(results["HFLM"], results["HarnessLM"])
            instances = build_requests(task, folder)
            lm_best = {"HFLM": math.inf, "HarnessLM": math.inf}
            cpu_best = {"HFLM": math.inf, "HarnessLM": math.inf}
            outs = {}
            for _ in range(args.repeats):
                for name, lm in (("HFLM", hflm), ("HarnessLM", ours)):
                    seconds, cpu, outs[name] = run_requests(lm, kind, instances, args.device)
                    lm_best[name] = min(lm_best[name], seconds)
                    cpu_best[name] = min(cpu_best[name], cpu)
            name = kind.replace("_3shot", ", 3-shot")
            label = name if n is None else f"{name} ({n} tokens{', compiled' if mode == 'compiled' else ''})"
            rows.append({"kind": label, "task": task, "mode": mode, "requests": len(instances), "seconds": best, "first_run": first,
                         "speedup": best["HFLM"] / best["HarnessLM"], "lm_seconds": lm_best,
                         "lm_speedup": lm_best["HFLM"] / lm_best["HarnessLM"], "lm_cpu_seconds": cpu_best,
                         "lm_cpu_speedup": cpu_best["HFLM"] / cpu_best["HarnessLM"], "results": results,
                         "agree": same and same_outputs(outs["HFLM"], outs["HarnessLM"])})  # fmt: skip
        print(f"\n{args.n} passages, {args.layers} x {args.width} GPT-2, vocab {args.vocab}, batch {args.batch_size}, "
              f"generate_until decode steps: {args.gen_modes}; load average after: {os.getloadavg()[0]:.2f}\n")  # fmt: skip
        print("| request type | requests | model calls: HFLM s | HarnessLM s | speed-up | CPU: HFLM s | HarnessLM s | "
              "speed-up | simple_evaluate: HFLM s | HarnessLM s | speed-up | first run: HFLM s | HarnessLM s | "
              "results agree | HFLM | HarnessLM |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            fmt = lambda m: ", ".join(f"{k} {v:.6g}" for k, v in m.items())  # noqa: E731
            print(f"| {r['kind']} | {r['requests']} | {r['lm_seconds']['HFLM']:.2f} | {r['lm_seconds']['HarnessLM']:.2f} "
                  f"| {r['lm_speedup']:.2f}x | {r['lm_cpu_seconds']['HFLM']:.2f} | "
                  f"{r['lm_cpu_seconds']['HarnessLM']:.2f} | {r['lm_cpu_speedup']:.2f}x | "
                  f"{r['seconds']['HFLM']:.2f} | {r['seconds']['HarnessLM']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['first_run']['HFLM']:.2f} | {r['first_run']['HarnessLM']:.2f} | "
                  f"{r['agree']} | {fmt(r['results']['HFLM'])} | "
                  f"{fmt(r['results']['HarnessLM'])} |")  # fmt: skip
        write_json(args.json, rows, args.device, args=vars(args))


if __name__ == "__main__":
    main()
