"""SFT step, side by side: lightning_llm's ``SFT`` (full and LoRA) against TRL's ``SFTTrainer`` on the same Hugging
Face model and the same batches, on CPU.

A random ``LlamaForCausalLM`` and a BPE tokenizer trained on the embedded instruction task are saved to a temporary
directory; both sides load them from there and train on the same conversational prompt / completion examples in the
same order (sequential sampling, batch B, AdamW with the same settings, constant learning rate, no clipping, loss on
completion tokens only, no activation recomputation on either side unless ``--gradient-checkpointing``; TRL's own
default recomputes). Ours runs through ``lightning.Trainer.fit`` and TRL through ``SFTTrainer.train``, so a step
includes its trainer's overheads; both use torch's fused AdamW (TRL's default ``adamw_torch_fused``; ours the default
of every module, ``LLMModule.make_optimizer``). The losses of the first steps must agree (same batches, same weights).
Ours trains these right-padded rows without an attention mask (``SFT._training_inputs``: plain causal attention gives
the real tokens the same values); TRL's model builds and keeps its padding mask.

Timing on a shared machine: ours and TRL run as two processes in lock step: both load at once, then step i of one
runs while the other waits, then step i of the other (the order alternates), so each pair of steps sees the same
load. The speed ratio is the median over the timed step pairs (``--repeats`` runs of each pair) of TRL's step time /
ours, leaving out pairs where a process got less than 0.75 cores per thread (CPU time / wall time): with 2 threads, a
thread descheduled by someone else's work stalls the other at every barrier, and such a step says nothing about the
code. ``step s``: the mean over the timed steps of each step's fastest repeat; ``tok/s``: their real tokens / their
summed time.

Default shape (``--preset realistic``) and why: a fine-tuning step of a real model is dominated by the output layer
and the sequence length, so both must look like fine-tuning. The embedding and output layer have 32000 rows (Llama-2 /
Mistral's vocabulary; real tokenizers have 32k-128k tokens): the model's ``vocab_size`` is padded past the 1024
tokens the small BPE tokenizer knows, as when a model's embedding is larger than its trained tokenizer. Each example
chains 8-32 instructions and answers each (136-547 tokens a row, mean 370; 61% of the tokens are completion, as in
typical instruction data; 47% of the padded positions are scored), so a padded batch of 4 rows holds about 1900
positions. The backbone stays small (hidden 512, 4 layers, ~45M parameters with the vocabulary) only so that the whole
comparison fits in about 6 minutes on 2 CPU cores. ``--preset tiny`` is the shape this benchmark used before
(1024-token vocabulary, one instruction per example, 14 positions a row, batch 8), kept for comparison: its step is a
few milliseconds of compute, mostly optimiser and framework overhead.

Memory: ``train MB`` is the peak resident memory during training (the peak is reset, after ``malloc_trim``, when
training starts) minus the resident memory before the model is built, so the model's weights count once on both sides
and the rest is gradients, optimiser state, activations, the trainer's buffers and what glibc's allocator keeps of
freed memory (with its defaults, freed blocks under 32 MiB stay in the heap). The ``(tensors)`` rows run ours alone
with ``MALLOC_MMAP_THRESHOLD_=1048576`` (every block of 1 MiB or more is returned to the OS when freed), so their RSS
follows the live tensors; with and without activation recomputation (``+recompute``, on both LoRA and full). The
``(heap trim)`` rows run ours alone with :class:`lightning_llm.callbacks.CPUHeapTrim` (glibc's ``malloc_trim`` at
every block boundary: the freed heap goes back to the operating system while the step runs), timed, with glibc's
defaults otherwise; their step time is compared with the lock-step rows' (each of those steps also ran alone).

    python benchmarks/sft.py --json benchmarks/results/sft_cpu.json      # table (+ JSON with machine info)
    python benchmarks/sft.py --preset tiny                                # the previous, tiny shape

Notation: B batch, T padded length, V vocabulary.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LORA = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

PRESETS = {
    "realistic": {"vocab": 32000, "tasks": (8, 32), "batch": 4, "steps": 8, "warmup": 2},
    "tiny": {"vocab": 0, "tasks": (1, 1), "batch": 8, "steps": 8, "warmup": 2},
}
PAIRS = (("ours-full", "trl-full"), ("ours-lora", "trl-lora"))
KINDS = tuple(k for pair in PAIRS for k in pair)


def same_lora_init(model: torch.nn.Module) -> None:
    """Draw every ``lora_A`` from a generator seeded by (layer, projection), so both sides start from the same
    adapters (peft's own draw follows module order, which differs between our blocks and Hugging Face's)."""
    import re

    for name, module in model.named_modules():
        match = re.search(r"\.(\d+)\..*\.(\w+_proj)$", name)
        if match is None or not hasattr(module, "lora_A"):
            continue
        w = module.lora_A["default"].weight
        g = torch.Generator().manual_seed(int(match.group(1)) * 100 + len(match.group(2)) * 7 + ord(match.group(2)[0]))
        with torch.no_grad():
            w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) / w.shape[1] ** 0.5)  # peft's Kaiming-uniform bound


# ------------------------------------------------------------------------------------------------------ memory
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _current_rss_mb() -> float:
    return _status_mb("VmRSS")


def _start_peak() -> float:
    """Return freed heap to the OS and restart the peak-RSS counter (Linux ``clear_refs`` 5); the current RSS."""
    from lightning_llm.callbacks.heap_trim import glibc_malloc_trim

    trim = glibc_malloc_trim()
    if trim is not None:
        trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _current_rss_mb()


# ------------------------------------------------------------------------------------------------------ lock step
def _wait_turn() -> None:
    """Child side: say that a step is about to start and wait until the parent lets it run (one line on stdin)."""
    print("WAIT", flush=True)
    sys.stdin.readline()


def _end_turn() -> None:
    print("DONE", flush=True)


class Side:
    """Parent side of one run (a child process): lets it take one step at a time."""

    def __init__(self, kind: str, cmd: list[str], env: dict[str, str]) -> None:
        self.kind, self.err = kind, tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env
        )
        self.result: dict | None = None

    def expect(self, word: str) -> None:
        """Read the child's output up to a line starting with ``word`` (or its RESULT, which ends the run)."""
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT ") :])
                return
            if line.startswith(word):
                return
        self.err.seek(0)
        raise SystemExit(f"{self.kind} failed:\n{self.err.read()[-4000:]}")

    def step(self) -> None:
        """Run one training step alone: the child is waiting; afterwards wait until it is waiting again (or done)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.expect("DONE")
        self.expect("WAIT")
        if self.result is not None:  # that was its last step: let it exit before the other side's step
            self.proc.wait()

    def finish(self) -> dict:
        if self.result is None:
            self.expect("RESULT")
        self.proc.wait()
        if self.result is None:
            self.err.seek(0)
            raise SystemExit(f"{self.kind} gave no result:\n{self.err.read()[-4000:]}")
        return self.result


def run_lock_step(
    kinds: tuple[str, ...], common: list[str], steps: int, env: dict[str, str] | None = None
) -> list[dict]:
    """Run the given sides (ours and TRL) in lock step: the processes load at once, then take step i one after the
    other (which side goes first alternates), so the two runs of a step see the same machine load."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    sides = [Side(k, [sys.executable, __file__, "--child", k, *common], env) for k in kinds]
    for side in sides:
        side.expect("WAIT")
    for i in range(steps):
        for side in sides if i % 2 == 0 else sides[::-1]:
            side.step()
    return [side.finish() for side in sides]


# ------------------------------------------------------------------------------------------------------ data
def examples(n: int, tasks: tuple[int, int]) -> list[dict]:
    """``n`` conversational prompt / completion examples, each chaining ``tasks[0]..tasks[1]`` instructions of
    :func:`lightning_llm.data.sft.instruction_examples`: the prompt lists them one a line, the completion answers each
    on its line as ``<instruction> = <answer>`` (so about 60% of an example's tokens are completion, as in typical
    instruction data); ``(1, 1)`` gives those examples unchanged."""
    from lightning_llm.data.sft import instruction_examples

    lo, hi = tasks
    base = instruction_examples(n * hi, 1)
    if hi == 1:
        return base[:n]
    rng, out, i = random.Random(f"sft-benchmark-{lo}-{hi}"), [], 0
    for _ in range(n):
        k = rng.randint(lo, hi)
        chunk, i = base[i : i + k], i + k
        asks = [e["prompt"][0]["content"] for e in chunk]
        answers = [f"{ask} = {e['completion'][0]['content']}" for ask, e in zip(asks, chunk)]
        out.append(
            {
                "prompt": [{"role": "user", "content": "\n".join(asks)}],
                "completion": [{"role": "assistant", "content": "\n".join(answers)}],
            }
        )
    return out


def build(directory: Path, hidden: int, layers: int, vocab: int, max_length: int) -> None:
    import transformers

    from lightning_llm.data.sft import instruction_examples
    from lightning_llm.data.tokenizer import Tokenizer

    texts = [
        f"user: {e['prompt'][0]['content']}\nassistant: {e['completion'][0]['content']}\n"
        for e in instruction_examples(2000, 0)
    ]
    tok = Tokenizer.train_bpe(texts, vocab_size=1024)
    tok.save(directory)
    cfg = transformers.LlamaConfig(
        vocab_size=max(vocab, tok.vocab_size),  # rows past the tokenizer's are never fed, but are in every softmax
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max_length,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        bos_token_id=None,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


# ------------------------------------------------------------------------------------------------------ the two sides
def run_ours(model_dir: str, lora: bool, a: argparse.Namespace, out: str) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_llm.callbacks import CPUHeapTrim
    from lightning_llm.data.preference import ChatTemplate
    from lightning_llm.data.sft import collate_sft, tokenize_sft_example
    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.modules.sft import SFT

    tok = Tokenizer.from_pretrained(model_dir)
    items = [tokenize_sft_example(e, tok, ChatTemplate()) for e in examples(a.batch * a.steps, a.tasks)]
    loader = DataLoader(
        items, batch_size=a.batch, shuffle=False, collate_fn=functools.partial(collate_sft, pad_id=tok.pad_id)
    )
    record: dict = {"losses": [], "times": [], "cpu": [], "tokens": [], "positions": [], "rss_base": _current_rss_mb()}
    module = SFT(
        pretrained=model_dir,
        lora=LORA if lora else None,
        baseline=False,
        learning_rate=a.lr,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        warmup_steps=0,
        min_lr_ratio=1.0,  # constant learning rate, like TRL's "constant" schedule
        gradient_checkpointing=a.gradient_checkpointing,
    )
    module.configure_model()
    same_lora_init(module.model)
    record["trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record["rss_start"] = _start_peak()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _wait_turn()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["times"].append(time.perf_counter() - self.t0)
            record["cpu"].append(time.process_time() - self.c0)
            record["losses"].append(float(outputs["loss"]))
            record["tokens"].append(int(batch["attention_mask"].sum()))
            record["positions"].append(batch["input_ids"].numel())
            _end_turn()

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Probe(), *([CPUHeapTrim()] if os.environ.get("SFT_HEAP_TRIM") else [])],
        default_root_dir=out,
    )
    trainer.fit(module, train_dataloaders=loader)
    record["peak_rss"] = _status_mb("VmHWM")
    return record


def run_trl(model_dir: str, lora: bool, a: argparse.Namespace, out: str) -> dict:
    import datasets
    import transformers
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    from lightning_llm.data.preference import DEFAULT_CHAT_TEMPLATE

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    data = datasets.Dataset.from_list(examples(a.batch * a.steps, a.tasks))
    record: dict = {"losses": [], "times": [], "cpu": [], "tokens": [], "positions": [], "rss_base": _current_rss_mb()}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        )

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            record["tokens"].append(int(inputs["attention_mask"].sum()))
            record["positions"].append(inputs["input_ids"].numel())
            return loss

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["rss_start"] = _start_peak()

        def on_step_begin(self, args, state, control, **kwargs):
            _wait_turn()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            record["times"].append(time.perf_counter() - self.t0)
            record["cpu"].append(time.process_time() - self.c0)
            _end_turn()

    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=0.0,
        gradient_checkpointing=a.gradient_checkpointing,  # TRL's default is True; ours recomputes nothing either
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=a.max_length,
        dataloader_num_workers=0,
        seed=0,
        shuffle_dataset=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Probe()],
    )
    same_lora_init(trainer.model)
    record["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    record["peak_rss"] = _status_mb("VmHWM")
    return record


def child(kind: str, a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(a.threads))))
    side, mode = kind.split("-")
    with tempfile.TemporaryDirectory() as out:
        run = run_ours if side == "ours" else run_trl
        rec = run(a.model_dir, mode == "lora", a, out)
    rec["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(rec))


# ------------------------------------------------------------------------------------------------------ report
def combine(recs: list[dict], warmup: int) -> dict:
    """One row from the repeats of a run: each step's fastest time over the repeats (the same batch every time),
    summed over the timed steps; the largest memory."""
    n = len(recs[0]["times"])
    timed = range(min(warmup, n - 1), n)
    wall = sum(min(r["times"][i] for r in recs) for i in timed)
    tokens = sum(recs[0]["tokens"][i] for i in timed)
    return {
        "trainable": recs[0]["trainable"],
        "threads": recs[0]["threads"],
        "losses": recs[0]["losses"],
        "tokens": recs[0]["tokens"],
        "positions": recs[0]["positions"],
        "step_s": wall / len(timed),
        "tokens_per_s": tokens / wall,
        "train_mb": max(r["peak_rss"] - r["rss_base"] for r in recs),
        "peak_rss_mb": max(r["peak_rss"] for r in recs),
        "start_mb": max(r["rss_start"] - r["rss_base"] for r in recs),
    }


def step_ratios(ours_runs: list[dict], trl_runs: list[dict], warmup: int, threads: int) -> tuple[list, list]:
    """TRL's time / ours for each timed step of each repeat (the two ran one after the other), and the subset where
    neither process was starved by other work on the machine: a step that got less than 0.75 cores per thread (CPU
    time / wall time) waited for the CPU, and with several threads one starved thread stalls the others."""
    every, clean = [], []
    for ours, trl in zip(ours_runs, trl_runs):
        for i in range(min(warmup, len(ours["times"]) - 1), len(ours["times"])):
            r = trl["times"][i] / ours["times"][i]
            every.append(r)
            busy = min(run["cpu"][i] / run["times"][i] for run in (ours, trl))
            if busy >= 0.75 * threads:
                clean.append(r)
    return every, clean


def machine_info() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    root = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("trl", "peft", "lightning"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="realistic")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=None, help="model vocabulary (0: the tokenizer's 1024)")
    parser.add_argument("--tasks", type=int, nargs=2, default=None, help="instructions chained per example (min max)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the timings")
    parser.add_argument("--max-length", type=int, default=2048, help="positions of the model; no example is longer")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="lock-step runs of each pair")
    parser.add_argument(
        "--memory-runs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run ours alone (full, LoRA; recomputation off and on) with big blocks returned to the OS",
    )
    parser.add_argument(
        "--heap-trim-runs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run ours alone (full, LoRA) with lightning_llm.callbacks.CPUHeapTrim",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.tasks = tuple(a.tasks)
    if a.child:
        child(a.child, a)
        return

    started = time.perf_counter()
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    memory: dict[str, dict] = {}
    trimmed: dict[str, dict] = {}  # --heap-trim-runs: ours with lightning_llm.callbacks.CPUHeapTrim
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), a.hidden, a.layers, a.vocab, a.max_length)
        common = ["--preset", a.preset, "--model-dir", tmp, "--lr", str(a.lr), "--max-length", str(a.max_length)]
        common += ["--vocab", str(a.vocab), "--tasks", *map(str, a.tasks), "--batch", str(a.batch)]
        common += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
        flag = ["--gradient-checkpointing"] if a.gradient_checkpointing else []
        for _ in range(a.repeats):
            for pair in PAIRS:
                for kind, rec in zip(pair, run_lock_step(pair, common + flag, a.steps)):
                    runs[kind].append(rec)
        if a.memory_runs:  # ours alone, big blocks returned to the OS when freed: RSS ~ the live tensors
            for recompute in (False, True):
                for kind in ("ours-full", "ours-lora"):
                    extra = ["--gradient-checkpointing"] if recompute else []
                    (rec,) = run_lock_step((kind,), common + extra, a.steps, {"MALLOC_MMAP_THRESHOLD_": str(2**20)})
                    memory[f"{kind}{' +recompute' if recompute else ''}"] = combine([rec], a.warmup)
        if a.heap_trim_runs:  # ours alone with CPUHeapTrim (glibc's defaults otherwise): timed too
            for kind in ("ours-full", "ours-lora"):
                (rec,) = run_lock_step((kind,), common + flag, a.steps, {"SFT_HEAP_TRIM": "1"})
                trimmed[kind] = combine([rec], a.warmup)
    rows = {k: combine(v, a.warmup) for k, v in runs.items()}

    def ratio(key: str, x: str, y: str, table: dict = rows) -> float:
        return table[x][key] / table[y][key]

    speed, clean_counts = {}, {}
    for mode, name in (("full", "full"), ("lora", "LoRA")):
        every, clean = step_ratios(runs[f"ours-{mode}"], runs[f"trl-{mode}"], a.warmup, rows["ours-full"]["threads"])
        clean_counts[mode] = (len(clean), len(every))
        speed[f"throughput ours/TRL ({name})"] = statistics.median(clean or every)
        speed[f"throughput ours/TRL ({name}), every step"] = statistics.median(every)
    ratios = {
        **speed,
        "train memory LoRA/full (ours)": ratio("train_mb", "ours-lora", "ours-full"),
        "train memory LoRA/full (TRL)": ratio("train_mb", "trl-lora", "trl-full"),
        "train memory ours/TRL (full)": ratio("train_mb", "ours-full", "trl-full"),
        "train memory ours/TRL (LoRA)": ratio("train_mb", "ours-lora", "trl-lora"),
    }
    if memory:
        ratios["tensor memory LoRA/full (ours)"] = ratio("train_mb", "ours-lora", "ours-full", memory)
        ratios["tensor memory LoRA/full (ours, +recompute)"] = ratio(
            "train_mb", "ours-lora +recompute", "ours-full +recompute", memory
        )
    if trimmed:
        ratios["heap-trimmed memory LoRA/full (ours)"] = ratio("train_mb", "ours-lora", "ours-full", trimmed)
        for mode in ("full", "lora"):
            ratios[f"heap trim step time / without ({mode})"] = (
                trimmed[f"ours-{mode}"]["step_s"] / rows[f"ours-{mode}"]["step_s"]
            )
    loss_diff = {}
    for mode in ("full", "lora"):
        ours, trl = rows[f"ours-{mode}"], rows[f"trl-{mode}"]
        n = min(3, len(ours["losses"]), len(trl["losses"]))
        diff = max(abs(x - y) for x, y in zip(ours["losses"][:n], trl["losses"][:n]))
        loss_diff[f"first {n} losses |ours - TRL| ({mode})"] = diff
        if ours["tokens"] != trl["tokens"]:
            loss_diff[f"DIFFERENT BATCHES ({mode}): tokens a step ours {ours['tokens']} TRL {trl['tokens']}"] = 1.0

    r0 = rows["ours-full"]
    lines = [
        f"SFT step on CPU ({r0['threads']} threads): Llama hidden {a.hidden} x {a.layers} layers, vocabulary "
        f"{max(a.vocab, 1024)} (tokenizer 1024); preset {a.preset!r}: {a.tasks[0]}-{a.tasks[1]} instructions an "
        f"example, batch {a.batch}, {a.steps} steps, timed after {a.warmup}; activation recomputation "
        f"{'on' if a.gradient_checkpointing else 'off'} on both sides",
        f"each step: {sum(r0['positions']) / len(r0['positions']):.0f} positions (B x T) on average, "
        f"{sum(r0['tokens']) / len(r0['tokens']):.0f} real tokens; ours and TRL in lock step (step i of one, then of "
        f"the other), {a.repeats} run(s) of each pair",
        f"{'run':<30} {'trainable':>10} {'step s':>7} {'tok/s':>7} {'train MB':>9} {'peak RSS MB':>11}  first losses",
    ]
    extra_rows = [
        *((f"{k} (tensors)", v) for k, v in memory.items()),
        *((f"{k} (heap trim)", v) for k, v in trimmed.items()),
    ]
    for kind, r in [*rows.items(), *extra_rows]:
        shown = kind in rows or kind.endswith("(heap trim)")
        timed = f"{r['step_s']:>7.3f} {r['tokens_per_s']:>7.0f}" if shown else f"{'-':>7} {'-':>7}"
        lines.append(
            f"{kind:<30} {r['trainable']:>10} {timed} {r['train_mb']:>9.0f} {r['peak_rss_mb']:>11.0f}  "
            f"{[round(x, 5) for x in r['losses'][:3]]}"
        )
    for k, v in ratios.items():
        note = ""
        if k.startswith("throughput") and not k.endswith("every step"):
            mode = "full" if "(full)" in k else "lora"
            note = f"  (median of {clean_counts[mode][0]} of {clean_counts[mode][1]} step pairs: the unstarved ones)"
        lines.append(f"{k:<44} {v:.2f}x{note}")
    for k, v in loss_diff.items():
        lines.append(f"{k:<44} {v:.2e}")
    lines.append(f"wall time {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    if a.json:
        out = {
            "settings": {k: v for k, v in vars(a).items() if k not in ("child", "model_dir", "json")},
            "machine": machine_info(),
            "rows": [{"run": kind, **r} for kind, r in [*rows.items(), *extra_rows]],
            "runs": runs,
            "ratios": ratios,
            "memory_runs": memory,
            "heap_trim_runs": trimmed,
            "loss_diff": loss_diff,
            "table": lines,
        }
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
