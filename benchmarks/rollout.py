"""Rollout throughput: our KV-cache generation vs Hugging Face ``generate`` on the same tiny Llama, and PPO / RLOO
iterations/s with where their time goes.

    python benchmarks/rollout.py [--device cpu|cuda] [--batch-size 16] [--prompt-len 32] [--new-tokens 64]
                                 [--group 4] [--no-compile] [--json PATH]

Both models hold the SAME weights (a random ``LlamaForCausalLM`` converted with :func:`lightning_llm.hf.from_hf`);
decoding is greedy with no EOS (every row generates ``new_tokens`` tokens), and the outputs are checked to be identical
before timing. Tokens/s counts generated tokens (batch x new tokens), median of ``--repeats`` calls interleaved with
the other sides'; tokens per CPU second divides by the CPU time of this process instead (all threads), which waiting
for other processes on a shared machine does not inflate. A second measurement (``--group G``) decodes the same number
of rows made of B / G distinct prompts each repeated G times, as GRPO and RLOO sample G completions of a prompt: our
``generate`` runs each distinct prompt through the prefill once, ``transformers`` all B rows (what its
``num_return_sequences`` does too).

Our decoding is measured twice: with the compiled decode step (``generate(compile=True)``: ``torch.compile`` of the
fixed-shape step, one graph per batch size and cache capacity) and eagerly (``compile=False``). The compiled step is
built at the first call (its time is printed: it is paid once per process and shape, then amortised over every later
call) and warmed up before the timed calls; Hugging Face runs as by default (dynamic cache, no compilation).

PPO and RLOO iterations/s: one full iteration (rollout: generation, scoring, reference / value passes; update:
``ppo_epochs`` x ``num_minibatches`` optimiser steps for PPO, one for RLOO) of :class:`lightning_llm.modules.PPO` /
:class:`lightning_llm.modules.RLOO` on the embedded synthetic prompt task, with the rollouts decoded by the compiled
step unless ``--no-compile``; the table after it splits an iteration's wall time into phases (median over the timed
iterations; the rest is bookkeeping: advantages, statistics, the update loop).

Notation: B batch, P prompt length, N new tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import sync, write_json
from grpo import _Timer

ROLLOUT_PHASES = ("generation", "rewards", "old/ref/value forwards", "loss forward", "backward", "optimizer")


def tiny_llama(device: torch.device, vocab: int, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_llm.hf import from_hf

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3 // 64 * 64 + 64),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(device).eval()
    ours = from_hf(hf).to(device).eval()
    return hf, ours


def bench_generation(args: argparse.Namespace, device: torch.device, group: int = 1) -> dict[str, float]:
    """Our decoding and ``transformers``' on the same B rows; ``group`` > 1: B / group distinct prompts, each
    repeated ``group`` times (completions per prompt, as GRPO / RLOO sample them; both sides get the same rows)."""
    hf, ours = tiny_llama(device, args.vocab, args.hidden, args.layers, args.heads)
    g = torch.Generator().manual_seed(1)
    distinct = torch.randint(1, args.vocab, (args.batch_size // group, args.prompt_len), generator=g)
    prompts = distinct.repeat_interleave(group, dim=0).to(device)  # (B, P)
    mask = torch.ones_like(prompts)

    def run_hf():
        return hf.generate(
            input_ids=prompts,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )

    def run_ours(compile: bool):
        return ours.generate(
            prompts,
            max_new_tokens=args.new_tokens,
            temperature=0.0,
            eos_id=None,
            pad_id=0,
            prompt_mask=mask,
            compile=compile,
        )

    sides = {"hf": run_hf, "ours_eager": lambda: run_ours(False)}
    with torch.no_grad():
        reference = run_hf()[:, args.prompt_len :]
        same = torch.equal(reference, run_ours(False).responses)
        first_call = float("nan")
        if args.compile:
            sync(device)
            t0 = time.perf_counter()
            out = run_ours(True)  # compiles the decode step for this (B, cache capacity)
            sync(device)
            first_call = time.perf_counter() - t0
            same = same and torch.equal(reference, out.responses)
            sides["ours"] = lambda: run_ours(True)
        for fn in sides.values():  # warm-up
            fn()
        # interleaved repeats: a busy machine slows every side alike
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, list[float]] = {name: [] for name in sides}  # CPU seconds of this process (all threads)
        for _ in range(args.repeats):
            for name, fn in sides.items():
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    n = args.batch_size * args.new_tokens
    out = {f"{name}_tok_s": n / statistics.median(t) for name, t in times.items()}
    out.update({f"{name}_tok_cpu_s": n / statistics.median(t) for name, t in cpu.items()})
    return {**out, "identical": float(same), "first_call_s": first_call, "median_call_s": n / out.get("ours_tok_s", 1)}


def _manual(module) -> torch.optim.Optimizer:
    """Stand-ins for Lightning's manual-optimisation plumbing, so that a module's update runs without a Trainer."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.optimizers = lambda: opt
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda o, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(
        [p for p in module.parameters() if p.requires_grad], gradient_clip_val
    )
    return opt


def _time_phases(module, timer: _Timer, forwards: tuple[str, ...], loss: str) -> None:
    """Time the phases of an online-RL iteration: ``forwards`` are the methods run while building the experience
    (policy/value/reference passes), ``loss`` the method computing the objective in the update."""
    in_rollout = timer.flag_during(module, "experience")
    timer.wrap(module, "sample", "generation")
    timer.wrap(module, "_decode", "generation")
    timer.wrap(module, "score", "rewards")
    for name in forwards:
        timer.wrap(module, name, lambda: "old/ref/value forwards" if in_rollout[0] else "loss forward")
    timer.wrap(module, loss, "loss forward")
    timer.wrap(module, "manual_backward", "backward")
    timer.wrap(module, "clip_gradients", "optimizer")


def bench_online(
    args: argparse.Namespace, device: torch.device, algorithm: str, compile: bool
) -> tuple[float, dict[str, float]]:
    """Iterations/s of PPO or RLOO (rollout + update) and the median phase breakdown (wall seconds)."""
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules import RLOO
    from lightning_llm.modules.ppo import PPO

    dm = PromptDataModule(num_train=args.ppo_batch * 4, batch_size=args.ppo_batch)
    cfg = TransformerConfig(vocab_size=dm.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    common = dict(
        config=cfg,
        reward_functions=[TargetCharReward("a", 8)],
        max_new_tokens=8,
        log_completions_every_n_steps=0,
        compile_generation=compile,
    )
    timer = _Timer(ROLLOUT_PHASES)
    if algorithm == "ppo":
        m = PPO(ppo_epochs=4, num_minibatches=2, **common).to(device)
    else:
        m = RLOO(num_generations=4, **common).to(device)
    m.tokenizer = dm.tokenizer
    timer.time_optimizer(_manual(m))  # before _time_phases, which wraps the stand-ins
    if algorithm == "ppo":
        _time_phases(m, timer, ("policy_and_values", "reference_logprobs"), "ppo_losses")
    else:
        _time_phases(m, timer, ("completion_logprobs",), "loss")
    batches = list(dm.train_dataloader())
    if algorithm == "rloo":  # RLOO samples G completions per prompt: as many rows per rollout as PPO
        batches = [{k: v[: args.ppo_batch // 4] for k, v in b.items()} for b in batches]

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        timer.start()
        roll = m.rollout(b["prompt"], b["prompt_ids"])
        m.ppo_update(roll) if algorithm == "ppo" else m.update(roll)
        sync(device)
        timer.stop()

    for i in range(args.repeats + 1):  # the first is the warm-up (it compiles the decode step)
        step(i)
    return 1.0 / statistics.median(timer.times[1:]), {**timer.breakdown(), "warm-up iteration": timer.times[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--group", type=int, default=4,
                   help="a second generation measurement: B / group prompts, each repeated group times (1: skip)")  # fmt: skip
    p.add_argument("--ppo-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the table (rows + machine + commit) to this file")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure (and use in PPO/RLOO) our compiled decode step (default)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = bench_generation(args, device)
    grouped = bench_generation(args, device, args.group) if args.group > 1 else None
    online = {}  # (algorithm, compiled) -> (iterations/s, phases)
    for compile in (True, False) if args.compile else (False,):
        for algorithm in ("ppo", "rloo"):
            online[algorithm, compile] = bench_online(args, device, algorithm, compile)
    print(
        f"device={device} threads={torch.get_num_threads()} load average {os.getloadavg()[0]:.1f} "
        f"B={args.batch_size} P={args.prompt_len} N={args.new_tokens} "
        f"llama(hidden={args.hidden}, layers={args.layers}, vocab={args.vocab})"
    )
    identical = bool(gen["identical"]) and (grouped is None or bool(grouped["identical"]))
    print(f"greedy outputs identical: {identical}")
    rows = []  # the printed table, one object a row, the same column names (written by --json)
    measured = [(gen, "", (("tokens/s", "tok_s"), ("tokens per CPU second", "tok_cpu_s")))]
    if grouped is not None:
        shape = f", {args.batch_size // args.group} prompts x {args.group} completions"
        measured.append((grouped, shape, (("tokens/s", "tok_s"),)))
    for result, shape, units in measured:
        for unit, suffix in units:
            hf = result[f"hf_{suffix}"]
            for side, label in (("ours", "compiled"), ("ours_eager", "eager")):
                if f"{side}_{suffix}" in result:
                    ours = result[f"{side}_{suffix}"]
                    rows.append(
                        {
                            "measurement": f"generation {unit}, {label} decode step{shape}",
                            "lightning_llm": round(ours),
                            "transformers": round(hf),
                            "ratio": f"{ours / hf:.2f}x",
                        }
                    )
    for (algorithm, compile), (rate, _) in online.items():
        shape = (
            f"B={args.ppo_batch}, N=8, 4 epochs x 2 minibatches"
            if algorithm == "ppo"
            else f"{args.ppo_batch // 4} prompts x G=4, N=8"
        )
        other = "n/a (TRL has no PPO)" if algorithm == "ppo" else "TRL: see benchmarks/grpo.py (GRPO)"
        decode = "compiled" if compile else "eager"
        rows.append(
            {
                "measurement": f"{algorithm.upper()} iterations/s ({shape}, {decode} decode step)",
                "lightning_llm": round(rate, 2),
                "transformers": other,
                "ratio": "-",
            }
        )
    print("| measurement | lightning_llm | transformers | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['measurement']} | {r['lightning_llm']} | {r['transformers']} | {r['ratio']} |")
    if args.compile:
        n = args.batch_size * args.new_tokens
        saved = n / gen["ours_eager_tok_s"] - gen["median_call_s"]  # seconds per call, compiled vs eager
        print(
            f"\nfirst compiled generate call (builds the decode step): {gen['first_call_s']:.1f} s, then "
            f"{gen['median_call_s'] * 1e3:.0f} ms per call vs {n / gen['ours_eager_tok_s'] * 1e3:.0f} ms eager: "
            f"the compilation is paid back after {gen['first_call_s'] / max(saved, 1e-9):.0f} calls of this shape"
        )
    ppo_phases, rloo_phases = online["ppo", args.compile][1], online["rloo", args.compile][1]
    decode = "compiled" if args.compile else "eager"
    print(f"\nWhere an iteration's wall time goes ({decode} decode step; seconds, median over the timed iterations)")
    print(f"{'phase':<26}{'PPO':>10}{'RLOO':>10}")
    for phase in ppo_phases:
        print(f"{phase:<26}{ppo_phases[phase]:>10.4f}{rloo_phases[phase]:>10.4f}")
    print("(warm-up iteration: not timed above; it includes compiling the decode step when it is compiled)")
    write_json(
        args.json,
        rows,
        device,
        identical=identical,
        first_compiled_call_s=gen.get("first_call_s"),
        phases={"ppo": ppo_phases, "rloo": rloo_phases},
        args=vars(args),
    )


if __name__ == "__main__":
    main()
