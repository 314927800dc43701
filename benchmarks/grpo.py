"""GRPO iteration: our :class:`lightning_llm.modules.GRPO` vs TRL's ``GRPOTrainer``, side by side, on CPU.

    python benchmarks/grpo.py [--prompts 8] [--generations 8] [--new-tokens 16] [--steps 6] [--json PATH]
                              [--no-compile-generation] [--no-compile] [--trl-compile]

Both sides load the SAME tiny random Hugging Face ``LlamaForCausalLM`` directory (saved here with this project's
character tokenizer, which ``transformers.AutoTokenizer`` reads), get the same prompts (the embedded letters task),
the same reward function (:class:`~lightning_llm.data.synthetic.TargetCharReward`, TRL's signature), the same G,
completion budget, temperature 1, ``beta = 0``, ``loss_type = "dapo"`` and one optimiser step per generation batch
(TRL: ``per_device_train_batch_size = prompts x G``, ``steps_per_generation = 1``).

Measured:

* **seconds per iteration**: one generation batch end to end (generate, score, advantages, forward/backward, AdamW
  step); the median over ``--steps`` iterations after one warm-up iteration (Lightning's / HF Trainer's loop
  overhead included on both sides);
* the same in CPU seconds of the benchmark process (``time.process_time``, all threads): on a shared machine the
  wall time includes waiting for other processes, the CPU time does not;
* **generation tokens/s**: generated tokens (up to and including EOS, counted from the completion masks) per second
  of each side's own generation path: :func:`lightning_llm.nn.generate` (KV cache) vs TRL's ``_generate`` (Hugging
  Face ``generate`` with its cache), median of ``--steps`` calls on the same B x G prompts;
* **where an iteration's time goes** (wall seconds, median over the timed iterations), the same phases on both sides:
  generation (ours ``sample`` + decoding the completions to text; TRL ``_generate``, which also tokenizes the
  prompts), rewards (``score`` / ``_calculate_rewards``), old/reference log-probabilities (the policy/reference
  forwards of the rollout; none here: ``beta = 0`` and one update per generation batch), loss forward (the policy
  forward, log-probabilities and the loss; ``completion_logprobs`` + ``loss`` / ``compute_loss``), backward
  (``manual_backward`` / ``accelerator.backward``), optimizer (gradient clipping + ``optimizer.step``), and the rest
  (each framework's loop, advantages, logging).

Our generation decodes with the compiled step by default (``GRPO(compile_generation=True)``: ``torch.compile`` of
the fixed-shape decode step, :func:`lightning_llm.nn.generate` with ``compile=True``), and the policy's forward (and,
through AOTAutograd, its backward) is compiled too (the module's documented ``compile`` option,
``GRPO(compile={"dynamic": True})``: the prompts' padded length and the completions' length change from batch to
batch, and a graph with dynamic sizes from the start compiles once, where the default would compile a static graph,
then a dynamic one at the first new length, inside a timed iteration). The compilations happen in the warm-up
iteration, which is not timed, and its duration is printed (the warm-up iteration's time), with the slowest timed
iteration (a compilation after the warm-up would show there). ``--no-compile-generation`` / ``--no-compile``
measure our eager decoding / training forward.

TRL runs as it does by default: Hugging Face ``generate`` and no ``torch_compile``. ``--trl-compile`` gives TRL its
own ``GRPOConfig(torch_compile=True)``; measured with TRL 1.16 / transformers 5.24 / torch 2.13 on this benchmark it
is much slower, not faster: Dynamo recompiles TRL's ``_fused_forward`` at every step (a guard on the number of forward
hooks of the embedding, which grows) until it hits ``recompile_limit`` (8), about 2 s per iteration against 0.1 s
eager, so the headline compares with TRL's faster eager default.

Prints a table with ratios (TRL / ours for time, ours / TRL for throughput); ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_model_dir(root: Path, hidden: int, layers: int, heads: int) -> Path:
    """A random tiny Llama + this project's character tokenizer, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_llm.data.synthetic import char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    torch.manual_seed(0)
    path = root / "policy"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save(path)
    return path


PHASES = ("generation", "rewards", "old/ref logprobs", "loss forward", "backward", "optimizer")


class _Timer:
    """Wall time and CPU time (of this process, all threads) of each training step or call, and the wall time of each
    phase (:data:`PHASES`) inside each step, from the methods :meth:`wrap` times."""

    def __init__(self, phases: tuple[str, ...] = PHASES) -> None:
        self.phase_names = phases
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.phases: list[dict[str, float]] = []
        self._t0 = self._c0 = 0.0
        self._current: dict[str, float] = {}
        self._active: str | None = None  # a phase being timed: nested timed calls are not counted twice

    def start(self) -> None:
        self._current = dict.fromkeys(self.phase_names, 0.0)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)
        self.phases.append(self._current)

    def wrap(self, obj, name: str, phase, rename: str | None = None) -> None:
        """Replace ``obj.<name>`` (a bound method) with a version whose wall time is added to ``phase`` (a name, or a
        callable returning one, or None to skip this call); stored as ``obj.<rename or name>``."""
        fn = getattr(obj, name)
        timer = self

        def timed(*args, **kwargs):
            which = phase() if callable(phase) else phase
            if which is None or timer._active is not None:
                return fn(*args, **kwargs)
            timer._active = which
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer._current[which] = timer._current.get(which, 0.0) + time.perf_counter() - t0
                timer._active = None

        setattr(obj, rename or name, timed)

    @staticmethod
    def flag_during(obj, name: str) -> list[bool]:
        """Wrap ``obj.<name>`` so that the returned one-element flag is True while it runs (to attribute the calls
        made inside it, e.g. log-probabilities computed while building the experience, to another phase)."""
        fn, flag = getattr(obj, name), [False]

        def flagged(*args, **kwargs):
            flag[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                flag[0] = False

        setattr(obj, name, flagged)
        return flag

    def time_optimizer(self, optimizer) -> None:
        """Add each ``optimizer.step`` (hooks on the torch optimizer) to the ``optimizer`` phase."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's / Lightning's wrapper
        t0 = [0.0]

        def pre(*a) -> None:
            t0[0] = time.perf_counter()

        def post(*a) -> None:
            self._current["optimizer"] += time.perf_counter() - t0[0]

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)

    def breakdown(self) -> dict[str, float]:
        """Median wall seconds of each phase and of the rest over the timed steps (the first one is the warm-up)."""
        rows = self.phases[1:]
        out = {p: statistics.median(r[p] for r in rows) for p in self.phase_names}
        out["rest"] = statistics.median(t - sum(r.values()) for t, r in zip(self.times[1:], rows))
        return out

    def result(self, tokens: list[float] | None = None) -> dict[str, float]:
        skip = 1 if tokens is None else 0  # the first training step is the warm-up
        out = {"wall": statistics.median(self.times[skip:]), "cpu": statistics.median(self.cpu[skip:])}
        if tokens is not None:
            out = {
                "wall": statistics.median(n / t for n, t in zip(tokens, self.times)),
                "cpu": statistics.median(n / t for n, t in zip(tokens, self.cpu)),
            }
        return out


def bench_ours(path: Path, prompts: list[str], args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    import lightning as L

    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules import GRPO
    from lightning_llm.nn.generation import generate

    timer = _Timer()

    class Timing(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            timer.time_optimizer(trainer.optimizers[0])

        def on_train_batch_start(self, *a) -> None:
            timer.start()

        def on_train_batch_end(self, *a) -> None:
            timer.stop()

    n = args.prompts * (args.steps + 1)
    texts = (prompts * (n // len(prompts) + 1))[:n]
    dm = PromptDataModule(prompts=texts, val_fraction=0, tokenizer=str(path), batch_size=args.prompts)
    model = GRPO(
        pretrained=str(path),
        reward_functions=[TargetCharReward("a", args.new_tokens)],
        num_generations=args.generations,
        max_new_tokens=args.new_tokens,
        learning_rate=1e-6,
        log_completions_every_n_steps=0,
        compile_generation=args.compile_generation,
        compile={"dynamic": True} if args.compile else False,
    )
    in_rollout = timer.flag_during(model, "experience")  # log-probabilities computed meanwhile are "old/ref"
    timer.wrap(model, "sample", "generation")
    timer.wrap(model, "_decode", "generation")
    timer.wrap(model, "score", "rewards")
    timer.wrap(model, "completion_logprobs", lambda: "old/ref logprobs" if in_rollout[0] else "loss forward")
    timer.wrap(model, "loss", "loss forward")
    timer.wrap(model, "manual_backward", "backward")
    timer.wrap(model, "clip_gradients", "optimizer")
    trainer = L.Trainer(
        max_steps=args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timing()],
    )
    trainer.fit(model, datamodule=dm)
    step = timer.result()
    tok = model.tokenizer
    ids = [tok.encode(p) for p in prompts[: args.prompts] for _ in range(args.generations)]
    gen, tokens = _Timer(), []
    for _ in range(args.steps):
        gen.start()
        out = generate(
            model.policy,
            ids,
            max_new_tokens=args.new_tokens,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            compile=args.compile_generation,
        )
        gen.stop()
        tokens.append(float(out.response_mask.sum()))
    phases = {**timer.breakdown(), "warm-up iteration": timer.times[0], "slowest timed iteration": max(timer.times[1:])}
    return _rows(step, gen.result(tokens)), phases


def _rows(step: dict[str, float], gen: dict[str, float]) -> dict[str, float]:
    return {
        "seconds_per_iteration": step["wall"],
        "cpu_seconds_per_iteration": step["cpu"],
        "generation_tokens_per_s": gen["wall"],
        "generation_tokens_per_cpu_s": gen["cpu"],
    }


def bench_trl(
    path: Path, prompts: list[str], args: argparse.Namespace, out_dir: Path
) -> tuple[dict[str, float], dict[str, float]]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_llm.data.synthetic import TargetCharReward

    timer = _Timer()

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, optimizer=None, **k) -> None:
            timer.time_optimizer(optimizer)

        def on_step_begin(self, *a, **k) -> None:
            timer.start()

        def on_step_end(self, *a, **k) -> None:
            timer.stop()

    tokenizer = AutoTokenizer.from_pretrained(path)
    config = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.new_tokens,
        max_steps=args.steps + 1,
        learning_rate=1e-6,
        beta=0.0,
        loss_type="dapo",
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        torch_compile=args.trl_compile,
    )
    data = Dataset.from_dict({"prompt": (prompts * (args.steps + 2))[: args.prompts * (args.steps + 2)]})
    trainer = GRPOTrainer(
        model=str(path),
        reward_funcs=[TargetCharReward("a", args.new_tokens)],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Timing()],
    )
    in_rollout = timer.flag_during(trainer, "_generate_and_score_completions")
    timer.wrap(trainer, "_generate", "generation")
    timer.wrap(trainer, "_calculate_rewards", "rewards")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", lambda: "old/ref logprobs" if in_rollout[0] else None)
    timer.wrap(trainer, "compute_loss", "loss forward")
    timer.wrap(trainer.accelerator, "backward", "backward")
    timer.wrap(trainer, "_clip_grad_norm", "optimizer")
    trainer.train()
    step = timer.result()
    batch = [p for p in prompts[: args.prompts] for _ in range(args.generations)]
    gen, tokens = _Timer(), []
    trainer.model.eval()
    for _ in range(args.steps):
        gen.start()
        completion_ids = trainer._generate(batch)[1]
        gen.stop()
        tokens.append(float(sum(len(c) for c in completion_ids)))
    phases = {**timer.breakdown(), "warm-up iteration": timer.times[0], "slowest timed iteration": max(timer.times[1:])}
    return _rows(step, gen.result(tokens)), phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="completion budget")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed iterations (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=str, default=None, help="write the rows to this file")
    parser.add_argument(
        "--compile-generation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="our rollouts decode with the compiled step (default; compiled in the warm-up iteration)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: GRPO(compile={'dynamic': True}), the policy's forward compiled (default; in the warm-up iteration)",
    )
    parser.add_argument(
        "--trl-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TRL: GRPOConfig(torch_compile=True) (default off: see the module docstring)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lightning_llm.data.synthetic import synthetic_prompts

    prompts = synthetic_prompts(max(args.prompts, 64), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(Path(tmp), args.hidden, args.layers, args.heads)
        ours, ours_phases = bench_ours(path, prompts, args)
        trl, trl_phases = bench_trl(path, prompts, args, Path(tmp) / "trl")
    rows = []
    for metric in ours:
        lower_is_better = metric.endswith("per_iteration")
        ratio = trl[metric] / ours[metric] if lower_is_better else ours[metric] / trl[metric]
        rows.append({"metric": metric, "ours": ours[metric], "trl": trl[metric], "speedup": ratio})
    setting = (
        f"B={args.prompts} prompts x G={args.generations}, {args.new_tokens} new tokens, Llama {args.layers}x"
        f"{args.hidden}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, our decode "
        f"step {'compiled' if args.compile_generation else 'eager'}, our policy forward "
        f"{'compiled' if args.compile else 'eager'}, TRL torch_compile={args.trl_compile}"
    )
    print(f"\nGRPO iteration on CPU ({setting})")
    print(f"{'metric':<30}{'ours':>12}{'TRL':>12}{'ours vs TRL':>14}")
    for r in rows:
        print(f"{r['metric']:<30}{r['ours']:>12.4g}{r['trl']:>12.4g}{r['speedup']:>13.2f}x")
    print("\nWhere an iteration's wall time goes (seconds, median over the timed iterations)")
    print(f"{'phase':<30}{'ours':>12}{'TRL':>12}")
    for phase in ours_phases:
        print(f"{phase:<30}{ours_phases[phase]:>12.4f}{trl_phases[phase]:>12.4f}")
    print(
        "(warm-up iteration: not timed above; ours includes compiling the decode step and the policy's forward and "
        "backward when they are compiled, TRL's its model with --trl-compile; slowest timed iteration: a compilation "
        "after the warm-up would show there)"
    )
    write_json(args.json, rows, setting=setting, phases={"ours": ours_phases, "trl": trl_phases})


if __name__ == "__main__":
    main()
