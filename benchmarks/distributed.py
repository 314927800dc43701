"""DDP vs FSDP2 (vs FSDP2 + tensor parallel) on 2 CPU processes (gloo): per-rank memory, speed, loss; CausalLM and RLHF.

    python benchmarks/distributed.py [--steps 20] [--n-layer 4] [--n-embd 256] [--rlhf-steps 4] [--rlhf-n-layer 8]
        [--rlhf-n-embd 512] [--only causal|rlhf] [--malloc-mmap-threshold BYTES] [--json PATH]

For each row the script re-launches itself as a 2-process Lightning run (a fresh pair of processes per row, so peak
RSS is the row's own) with the same seed and global batch.

**CausalLM** (DDP / FSDP2: 2 data-parallel ranks x B; FSDP2+TP: 1 data-parallel rank of 2 tensor-parallel ranks x 2B),
measured on rank 0:

* parameter + AdamW-state bytes held by the rank (local shards of DTensors, after the first step);
* training tokens/s over the steps after the first two (global tokens per second of wall time);
* the final training loss (averaged over ranks), which must agree across strategies.

**RLHF** (``DPO``, ``PPO``, ``GRPO``; DDP vs FSDP2, every rank with its own B prompts / pairs): each module holds all
its models: DPO the policy and a frozen reference; PPO the policy, a separate value model (initialised from the
reward model), the frozen reference and a frozen reward model (a random ``RewardModel`` checkpoint written here);
GRPO the policy, its reference (``beta > 0``) and the reward model. Measured on every rank, the table shows the
larger of the two ranks:

* **states/rank**: the bytes the rank holds for parameters (all models, frozen ones included) + gradients (the
  largest total of ``.grad`` seen at an optimiser step, through a step pre-hook: PPO and GRPO free them after each
  step inside ``training_step``) + AdamW state (after the first step); local shards of DTensors;
* **live**: the bytes of every CPU tensor storage the process still references after ``fit`` (a ``gc`` walk; a
  DTensor counts its local shard): an independent count of what the rank keeps (PPO and GRPO have freed their
  gradients by then);
* **peak RSS**: the process's ``VmHWM`` at the end of training, and **in fit**: how far training raised it above the
  peak the process had once the module was built. Every rank builds every model whole before ``fit``
  (``configure_model`` runs eagerly in the module's ``__init__``; the value and reward models are copies or loads of
  whole checkpoints) and shards it in ``fit``, so the peak before training is the unsharded size under both
  strategies. glibc's default allocator keeps in the heap much of what ``fit`` frees (the whole weights once
  sharded, FSDP2's per-layer all-gather / reduce-scatter buffers), and FSDP2's peak RSS ends ABOVE DDP's (1.13-1.25x
  in the saved run) although it holds half the live bytes. ``--malloc-mmap-threshold 131072`` serves large blocks by ``mmap``
  (returned to the OS when freed; more system time): FSDP2's peak RSS then falls to 0.68-0.81x of DDP's, its floor
  being the whole models every rank builds before ``fit`` (``benchmarks/results/distributed_cpu_rlhf_mmap.txt``);
* **s/step**: median wall time of a training step (DPO: one optimiser step; PPO / GRPO: one rollout with its
  updates) after the first, and **cpu s**: the same in CPU seconds of the process (``time.process_time``): on a
  shared machine the wall time includes waiting for other processes (and for the other rank, descheduled), the CPU
  time does not;
* the final training loss (DPO) or reward (PPO, GRPO), averaged over ranks: the strategies must agree (each rank
  samples the same tokens under both, see ``tests/modules/test_rlhf_fsdp2.py``).

Ratios are FSDP2 / DDP of the same run. Goals: FSDP2 holds <= 0.55x of DDP's per-rank states (CausalLM, and each RLHF
module: FSDP2 shards the trained AND the frozen models). Timings on a shared 2-core machine are noisy; compare the
ratios of one run.
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

os.environ.setdefault("OMP_NUM_THREADS", "1")

STRATEGIES = ("ddp", "fsdp2", "fsdp2_tp")
RLHF_MODULES = ("dpo", "ppo", "grpo")
RLHF_STRATEGIES = ("ddp", "fsdp2")
RLHF_WORKERS = tuple(f"{m}:{s}" for m in RLHF_MODULES for s in RLHF_STRATEGIES)


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from _common import step_probe, token_rows_dataset
    from torch.utils.data import DataLoader

    from lightning_llm.config import TransformerConfig
    from lightning_llm.modules.causal_lm import CausalLM
    from lightning_llm.parallel import ddp, fsdp2

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n_rows = args.steps * args.batch_size * 2
    steps = torch.randint(0, 3, (n_rows, args.block_size + 1), generator=g)
    tokens = (torch.randint(0, args.vocab_size, (n_rows, 1), generator=g) + steps.cumsum(1)) % args.vocab_size
    tp = args.worker == "fsdp2_tp"
    strategy = {"ddp": lambda: ddp(), "fsdp2": lambda: fsdp2(), "fsdp2_tp": lambda: fsdp2(tensor_parallel_size=2)}
    cfg = TransformerConfig(
        vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=8, n_embd=args.n_embd
    )
    model = CausalLM(config=cfg, learning_rate=1e-3, warmup_steps=2)
    per_rank_batch = args.batch_size * (2 if tp else 1)
    loader = DataLoader(token_rows_dataset(tokens), batch_size=per_rank_batch, shuffle=False)
    probe = step_probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy[args.worker](), precision="32-true", max_steps=args.steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[probe], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    if trainer.is_global_zero:
        global_tokens = 2 * args.batch_size * args.block_size
        tps = global_tokens * (len(probe.times) - 2) / (probe.times[-1] - probe.times[1])
        Path(args.out).write_text(json.dumps({"bytes": probe.bytes, "tokens_per_sec": tps, "losses": probe.losses}))


# ------------------------------------------------------------------------------------------------------------ RLHF
def _rss_bytes() -> int:
    """The process's peak resident set size so far: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``VmHWM`` belongs to the current address space and restarts at ``exec``; ``ru_maxrss`` survives it, so in rank 1
    (a process Lightning forks and re-executes from rank 0 after rank 0 has built its models) it would start at rank
    0's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; macOS: bytes (upper bound)


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage the process still references (a DTensor counts its local shard):
    what the rank holds alive, without the allocator's slack and the transient buffers that peak RSS includes."""
    import gc

    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            storage = (obj._local_tensor if hasattr(obj, "_local_tensor") else obj).untyped_storage()
        except Exception:  # objects that fail isinstance, tensors without storage (meta, wrapper subclasses)
            continue
        if storage.device.type == "cpu" and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def rlhf_probe():
    """A callback measuring what a rank holds (see the module docstring) and every training step's end time."""
    from lightning.pytorch.callbacks import Callback

    from lightning_llm.parallel import sharded_state_bytes

    class RLHFProbe(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.grad_bytes = 0
            self.states: dict[str, int] | None = None
            self._hooked = False

        def _grad_hook(self, optimizer, args, kwargs) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.grad_bytes = max(self.grad_bytes, _local_bytes(grads))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not self._hooked:  # the torch optimiser under Lightning's wrapper: also stepped by manual optimisation
                trainer.optimizers[0].register_step_pre_hook(self._grad_hook)
                self._hooked = True
            if not self.times:
                self.times.append(time.perf_counter())
                self.cpu_times.append(time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            if self.states is None:
                self.states = sharded_state_bytes(pl_module, trainer.optimizers[0])

    return RLHFProbe()


def _reward_checkpoint(path: Path, args: argparse.Namespace) -> None:
    """A random ``RewardModel`` checkpoint with the prompt data's tokenizer and the policy's architecture."""
    import torch

    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.tokenizer import tokenizer_state
    from lightning_llm.modules.reward_model import RewardModel

    dm = PromptDataModule(num_train=8, num_val=8, batch_size=1)
    torch.manual_seed(1)
    rm = RewardModel(config=_rlhf_config(args, dm.vocab_size))
    torch.save({"state_dict": rm.state_dict(), "transformer_config": rm.config.to_dict(),
                **tokenizer_state(dm.tokenizer)}, path)  # fmt: skip


def _rlhf_config(args: argparse.Namespace, vocab_size: int):
    from lightning_llm.config import TransformerConfig

    return TransformerConfig(vocab_size=vocab_size, block_size=64, n_layer=args.rlhf_n_layer, n_head=8, n_kv_head=4,
                             n_embd=args.rlhf_n_embd)  # fmt: skip


def rlhf_worker(args: argparse.Namespace) -> None:
    baseline_rss = _rss_bytes()
    import lightning as L
    import torch

    from lightning_llm.data.preference import PreferenceDataModule
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.synthetic import LetterShiftReward, TargetCharReward
    from lightning_llm.parallel import ddp, fsdp2

    baseline_rss = max(baseline_rss, _rss_bytes())
    name, strategy = args.worker.split(":")
    L.seed_everything(0)
    b = args.rlhf_batch_size
    if name == "dpo":
        from lightning_llm.modules.dpo import DPO

        dm = PreferenceDataModule(num_train=b * 2 * (args.rlhf_steps + 1), num_val=8, max_length=64,
                                  max_prompt_length=24, batch_size=b)  # fmt: skip
        module = DPO(config=_rlhf_config(args, dm.vocab_size), beta=0.1, learning_rate=1e-4, warmup_steps=1)
        key = "train/loss"
    else:
        dm = PromptDataModule(num_train=b * 2 * (args.rlhf_steps + 1), num_val=8, batch_size=b)
        common = {"config": _rlhf_config(args, dm.vocab_size), "reward_model": args.reward_ckpt,
                  "max_new_tokens": args.rlhf_new_tokens, "learning_rate": 1e-5, "log_completions_every_n_steps": 0}  # fmt: skip
        if name == "ppo":
            from lightning_llm.modules.ppo import PPO

            # value_model: separate (initialised from the reward model) since a reward model is given
            module = PPO(reward_functions=[TargetCharReward("a", 6)], ppo_epochs=2, num_minibatches=2, **common)
            key = "train/reward_mean"
        else:
            from lightning_llm.modules.grpo import GRPO

            module = GRPO(reward_functions=[LetterShiftReward(1)], num_generations=4, beta=0.04, num_minibatches=2,
                          **common)  # fmt: skip
            key = "train/reward"
    built_rss = _rss_bytes()  # every model whole on this rank (sharded in fit under FSDP2)
    probe = rlhf_probe()
    optimizer_steps = {"dpo": 1, "ppo": 4, "grpo": 2}[name]  # per training step (max_steps counts optimiser steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ddp() if strategy == "ddp" else fsdp2(), precision="32-true",
        max_steps=args.rlhf_steps * optimizer_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[probe], gradient_clip_val=1.0 if module.automatic_optimization else None,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    live = _live_tensor_bytes()
    final = float(trainer.strategy.reduce(trainer.callback_metrics[key].detach().float().clone(), reduce_op="mean"))
    steps = [t1 - t0 for t0, t1 in zip(probe.times, probe.times[1:])]
    cpu = [t1 - t0 for t0, t1 in zip(probe.cpu_times, probe.cpu_times[1:])]
    row = {
        **probe.states,
        "grad_bytes": probe.grad_bytes,
        "peak_rss": _rss_bytes(),
        "baseline_rss": baseline_rss,
        "built_rss": built_rss,
        "live_bytes": live,
        "step_s": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
        "step_cpu_s": statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0],
        "steps": len(steps),
    }
    rows = [None] * trainer.world_size
    torch.distributed.all_gather_object(rows, row)
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({"ranks": rows, "final": final, "key": key}))


def _rlhf_table(args: argparse.Namespace, results: dict[str, dict]) -> list[str]:
    lines = [
        f"RLHF modules, 2 CPU processes (gloo), fp32, every model n_layer={args.rlhf_n_layer} "
        f"n_embd={args.rlhf_n_embd} (8 heads, 4 kv heads, character vocabulary), {args.rlhf_batch_size} "
        f"prompts / pairs per rank, {args.rlhf_new_tokens} new tokens, {args.rlhf_steps} steps, AdamW",
        "models held: DPO policy + reference; PPO policy + value + reference + reward; GRPO policy + reference + reward",
        "allocator: glibc's default"
        if args.malloc_mmap_threshold is None
        else f"allocator: MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (larger blocks mmap'd, returned when freed)",
    ]
    head = (
        f"{'module':<6} {'strategy':<8} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} {'states/rank':>12} "
        f"{'x DDP':>6} {'live':>8} {'peak RSS':>9} {'x DDP':>6} {'in fit':>7} {'x DDP':>6} {'s/step':>7} {'x DDP':>6} "
        f"{'cpu s':>6} {'x DDP':>6} {'final':>9}"
    )
    lines += [head, "-" * len(head)]
    ratios = {}
    for module in RLHF_MODULES:
        base = None
        for strategy in RLHF_STRATEGIES:
            r = results.get(f"{module}:{strategy}")
            if r is None:
                continue
            ranks = r["ranks"]
            worst = {k: max(x[k] for x in ranks) for k in ranks[0]}  # the larger rank (ranks hold about the same)
            states = worst["param_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"]
            growth = max(x["peak_rss"] - x["built_rss"] for x in ranks)
            cur = {"states": states, "rss": worst["peak_rss"], "growth": growth, "step_s": worst["step_s"],
                   "cpu_s": worst["step_cpu_s"]}  # fmt: skip
            base = base or cur
            ratios[f"{module}:{strategy}"] = {k: cur[k] / base[k] for k in cur}
            mib = 2**20
            lines.append(
                f"{module:<6} {strategy:<8} {worst['param_bytes'] / mib:>10.2f} {worst['grad_bytes'] / mib:>9.2f} "
                f"{worst['optimizer_bytes'] / mib:>9.2f} {states / mib:>10.2f}Mi {states / base['states']:>6.3f} "
                f"{worst['live_bytes'] / mib:>6.1f}Mi {worst['peak_rss'] / mib:>7.0f}Mi {worst['peak_rss'] / base['rss']:>6.2f} {growth / mib:>5.0f}Mi "
                f"{growth / base['growth']:>6.2f} "
                f"{worst['step_s']:>7.2f} {worst['step_s'] / base['step_s']:>6.2f} {worst['step_cpu_s']:>6.2f} "
                f"{worst['step_cpu_s'] / base['cpu_s']:>6.2f} {r['final']:>9.5f}"
            )
    for module in RLHF_MODULES:
        got = ratios.get(f"{module}:fsdp2")
        if got is None:
            continue
        same = abs(results[f"{module}:fsdp2"]["final"] - results[f"{module}:ddp"]["final"]) < 1e-4
        verdict = "met" if got["states"] <= 0.55 else "MISSED"
        lines.append(
            f"goal {module.upper()} FSDP2 <= 0.55x DDP states: {verdict} ({got['states']:.3f}x); "
            f"same {results[f'{module}:ddp']['key']}: {same}"
        )
    return lines


def _causal_table(args: argparse.Namespace, results: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """The printed lines and the table as row objects (same columns)."""
    base = results["ddp"]
    mib = 2**20
    rows = [
        {
            "strategy": name,
            "params MiB": round(r["bytes"]["param_bytes"] / mib, 2),
            "optim MiB": round(r["bytes"]["optimizer_bytes"] / mib, 2),
            "states/rank MiB": round(r["bytes"]["total_bytes"] / mib, 2),
            "states x DDP": round(r["bytes"]["total_bytes"] / base["bytes"]["total_bytes"], 3),
            "tokens/s": round(r["tokens_per_sec"]),
            "tokens/s x DDP": round(r["tokens_per_sec"] / base["tokens_per_sec"], 2),
            "final loss": round(r["losses"][-1], 5),
        }
        for name, r in results.items()
    ]
    lines = [
        f"2 CPU processes (gloo), fp32, n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab_size} "
        f"T={args.block_size}, global batch {2 * args.batch_size}, {args.steps} steps, AdamW"
    ]
    head = f"{'strategy':<10} {'params MiB':>10} {'optim MiB':>10} {'states/rank':>12} {'x DDP':>6} {'tokens/s':>9} {'x DDP':>6} {'final loss':>11}"
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['strategy']:<10} {r['params MiB']:>10.2f} {r['optim MiB']:>10.2f} {r['states/rank MiB']:>10.2f}Mi "
            f"{r['states x DDP']:>6.3f} {r['tokens/s']:>9.0f} {r['tokens/s x DDP']:>6.2f} {r['final loss']:>11.5f}"
        )
    ratio = results["fsdp2"]["bytes"]["total_bytes"] / base["bytes"]["total_bytes"]
    same = abs(results["fsdp2"]["losses"][-1] - base["losses"][-1]) < 1e-4
    lines.append(
        f"goal FSDP2 <= 0.55x DDP states: {'met' if ratio <= 0.55 else 'MISSED'} ({ratio:.3f}x); same loss: {same}"
    )
    return lines, rows


def _launch(name: str, out: Path, extra: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], *extra, "--worker", name, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="per data-parallel rank (global batch = 2x)")
    p.add_argument("--rlhf-steps", type=int, default=4, help="RLHF training steps (PPO / GRPO: rollouts)")
    p.add_argument("--rlhf-n-layer", type=int, default=8)
    p.add_argument("--rlhf-n-embd", type=int, default=512)
    p.add_argument("--rlhf-batch-size", type=int, default=4, help="prompts (GRPO: x 4 completions) or pairs per rank")
    p.add_argument("--rlhf-new-tokens", type=int, default=8)
    p.add_argument("--only", choices=["causal", "rlhf"], default=None, help="run one of the two tables")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="RLHF workers: glibc's MALLOC_MMAP_THRESHOLD_ (bytes); e.g. 131072 serves every larger block by mmap, "
        "which returns it to the OS when freed, so RSS follows the live memory (default: glibc's own)",
    )
    p.add_argument("--json", default=None, help="also write every measured number to this file")
    p.add_argument("--worker", choices=STRATEGIES + RLHF_WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--reward-ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker in RLHF_WORKERS:
        return rlhf_worker(args)
    if args.worker:
        return worker(args)
    causal, rlhf = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "rlhf":
            for name in STRATEGIES:
                causal[name] = _launch(name, Path(tmp) / f"{name}.json", [])
        if args.only != "causal":
            ckpt = Path(tmp) / "reward.ckpt"
            _reward_checkpoint(ckpt, args)
            env = {}
            if args.malloc_mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            for name in RLHF_WORKERS:
                out = Path(tmp) / f"{name.replace(':', '_')}.json"
                rlhf[name] = _launch(name, out, ["--reward-ckpt", str(ckpt)], env)
    lines, rows = [], []
    if causal:
        lines, rows = _causal_table(args, causal)
    if rlhf:
        lines += ([""] if lines else []) + _rlhf_table(args, rlhf)
    print("\n".join(lines))
    from _common import write_json

    settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "out", "reward_ckpt")}
    write_json(args.json, rows, settings=settings, measured={"causal_lm": causal, "rlhf": rlhf})


if __name__ == "__main__":
    main()
