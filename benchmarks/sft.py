"""SFT step, side by side: lightning_llm's ``SFT`` (full and LoRA) against TRL's ``SFTTrainer`` on the same Hugging
Face model and the same batches, on CPU.

A random ``LlamaForCausalLM`` with a BPE tokenizer trained on the embedded instruction task is saved to a temporary
directory; both sides load it from there and train on the same conversational examples in the same order
(sequential sampling, batch B, AdamW with the same settings, constant learning rate, no clipping). Each of the four
runs (ours full, ours LoRA, TRL full, TRL LoRA with ``peft``) is a separate process, so its peak resident memory is its
own. Reported: median step time after warm-up, tokens/s, peak RSS and the RSS growth from the loaded model to the end
of training (gradients, optimiser state, activations), and the first steps' losses (ours vs TRL, same batches).

    python benchmarks/sft.py                      # table
    python benchmarks/sft.py --steps 12 --json results/sft.json

Notation: B batch, T padded length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(directory: Path, hidden: int, layers: int) -> None:
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
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        bos_token_id=None,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


def examples(n: int) -> list[dict]:
    from lightning_llm.data.sft import instruction_examples

    return instruction_examples(n, 1)


def run_ours(model_dir: str, lora: bool, batch: int, steps: int, lr: float) -> dict:
    from lightning_llm.data.preference import ChatTemplate
    from lightning_llm.data.sft import collate_sft, tokenize_sft_example
    from lightning_llm.data.tokenizer import Tokenizer
    from lightning_llm.modules.sft import SFT

    tok = Tokenizer.from_pretrained(model_dir)
    items = [tokenize_sft_example(e, tok, ChatTemplate()) for e in examples(batch * steps)]
    module = SFT(pretrained=model_dir, lora=LORA if lora else None, baseline=False)
    module.configure_model()
    same_lora_init(module.model)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rss0 = _current_rss_mb()
    losses, times, tokens = [], [], 0
    for s in range(steps):
        b = collate_sft(items[s * batch : (s + 1) * batch], tok.pad_id)
        t0 = time.perf_counter()
        loss = module.loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        tokens += int(b["attention_mask"].sum())
    return {
        "losses": losses,
        "times": times,
        "tokens": tokens,
        "rss0": rss0,
        "trainable": sum(p.numel() for p in params),
    }


def run_trl(model_dir: str, lora: bool, batch: int, steps: int, lr: float, out: str) -> dict:
    import datasets
    import transformers
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    from lightning_llm.data.preference import DEFAULT_CHAT_TEMPLATE

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
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
    record: dict = {"losses": [], "times": [], "tokens": 0}

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            record["tokens"] += int(inputs["attention_mask"].sum())
            return loss

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["times"].append(time.perf_counter() - self.t0)

    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=0.0,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=256,
        dataloader_num_workers=0,
        seed=0,
        shuffle_dataset=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples(batch * steps)),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    same_lora_init(trainer.model)
    record["rss0"] = _current_rss_mb()
    record["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return record


def child(kind: str, model_dir: str, batch: int, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    side, mode = kind.split("-")
    with tempfile.TemporaryDirectory() as out:
        rec = (
            run_ours(model_dir, mode == "lora", batch, steps, lr)
            if side == "ours"
            else run_trl(model_dir, mode == "lora", batch, steps, lr, out)
        )
    rec["peak_rss_mb"] = _rss_mb()
    print("RESULT " + json.dumps(rec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side; the fastest is kept")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.batch, args.steps, args.lr)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.hidden, args.layers)
        for kind in [k for _ in range(args.repeats) for k in ("ours-full", "trl-full", "ours-lora", "trl-lora")]:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--model-dir",
                tmp,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--lr",
                str(args.lr),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rec = json.loads(line[0][len("RESULT ") :])
            timed = rec["times"][args.warmup :] or rec["times"]
            rec["step_s"] = statistics.median(timed)
            rec["tokens_per_s"] = rec["tokens"] / len(rec["times"]) / rec["step_s"]
            rec["train_growth_mb"] = rec["peak_rss_mb"] - rec["rss0"]
            if kind not in results or rec["step_s"] < results[kind]["step_s"]:
                results[kind] = rec
    for mode in ("full", "lora"):
        ours, trl = results[f"ours-{mode}"], results[f"trl-{mode}"]
        n = min(3, len(ours["losses"]), len(trl["losses"]))
        results[f"loss_diff_first_{n}_{mode}"] = max(abs(a - b) for a, b in zip(ours["losses"][:n], trl["losses"][:n]))
    print(
        f"SFT step on CPU ({torch.get_num_threads()} threads), Llama hidden {args.hidden} x {args.layers} layers, "
        f"batch {args.batch}, {args.steps} steps (median after {args.warmup}, fastest of {args.repeats} interleaved runs); NOTE: a shared machine, times are noisy"
    )
    print(
        f"{'run':<10} {'trainable':>10} {'step s':>8} {'tok/s':>8} {'peak RSS MB':>12} {'train growth MB':>16}"
        f"  first losses"
    )
    for kind, r in results.items():
        if isinstance(r, dict):
            print(
                f"{kind:<10} {r['trainable']:>10} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.0f} "
                f"{r['peak_rss_mb']:>12.0f} {r['train_growth_mb']:>16.0f}  {[round(x, 5) for x in r['losses'][:3]]}"
            )
    ratios = {
        "throughput ours/TRL (full)": results["ours-full"]["tokens_per_s"] / results["trl-full"]["tokens_per_s"],
        "throughput ours/TRL (LoRA)": results["ours-lora"]["tokens_per_s"] / results["trl-lora"]["tokens_per_s"],
        "peak RSS LoRA/full (ours)": results["ours-lora"]["peak_rss_mb"] / results["ours-full"]["peak_rss_mb"],
        "train-memory growth LoRA/full (ours)": results["ours-lora"]["train_growth_mb"]
        / max(results["ours-full"]["train_growth_mb"], 1e-9),
    }
    for k, v in ratios.items():
        print(f"{k:<40} {v:.2f}x")
    for k, v in results.items():
        if k.startswith("loss_diff"):
            print(f"{k:<40} {v:.2e}")
    results["ratios"] = ratios
    results["settings"] = vars(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
