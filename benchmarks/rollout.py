"""Rollout throughput: our KV-cache generation vs Hugging Face ``generate`` on the same tiny Llama, and PPO steps/s.

    python benchmarks/rollout.py [--device cpu|cuda] [--batch-size 16] [--prompt-len 32] [--new-tokens 64]

Both models hold the SAME weights (a random ``LlamaForCausalLM`` converted with :func:`lightning_llm.hf.from_hf`);
decoding is greedy with no EOS (every row generates ``new_tokens`` tokens), and the two outputs are checked to be
identical before timing. Tokens/s counts generated tokens (batch x new tokens). PPO steps/s is one full iteration
(rollout + scoring + reference / value passes + ``ppo_epochs`` x ``num_minibatches`` updates) of
:class:`lightning_llm.modules.PPO` on the embedded synthetic prompt task.

Notation: B batch, P prompt length, N new tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import sync


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def bench_generation(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    hf, ours = tiny_llama(device, args.vocab, args.hidden, args.layers, args.heads)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab, (args.batch_size, args.prompt_len), generator=g).to(device)  # (B, P)
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

    def run_ours():
        return ours.generate(
            prompts, max_new_tokens=args.new_tokens, temperature=0.0, eos_id=None, pad_id=0, prompt_mask=mask
        )

    with torch.no_grad():
        same = torch.equal(run_hf()[:, args.prompt_len :], run_ours().responses)
        # interleaved repeats: a busy machine slows both sides alike
        times: dict[str, list[float]] = {"hf": [], "ours": []}
        for _ in range(args.repeats):
            for name, fn in (("hf", run_hf), ("ours", run_ours)):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    t_hf, t_ours = statistics.median(times["hf"]), statistics.median(times["ours"])
    n = args.batch_size * args.new_tokens
    return {"hf_tok_s": n / t_hf, "ours_tok_s": n / t_ours, "identical": float(same)}


def bench_ppo(args: argparse.Namespace, device: torch.device) -> float:
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules.ppo import PPO

    dm = PromptDataModule(num_train=args.ppo_batch * 4, batch_size=args.ppo_batch)
    cfg = TransformerConfig(vocab_size=dm.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    m = PPO(
        config=cfg,
        reward_functions=[TargetCharReward("a", 8)],
        max_new_tokens=8,
        ppo_epochs=4,
        num_minibatches=2,
        log_completions_every_n_steps=0,
    ).to(device)
    m.tokenizer = dm.tokenizer
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m.optimizers = lambda: opt
    m.manual_backward = lambda loss: loss.backward()
    m.clip_gradients = lambda o, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(
        [p for p in m.parameters() if p.requires_grad], gradient_clip_val
    )
    batches = list(dm.train_dataloader())

    def step(i=[0]):  # noqa: B006 - a counter
        b = batches[i[0] % len(batches)]
        i[0] += 1
        m.ppo_update(m.rollout(b["prompt"], b["prompt_ids"]))

    return 1.0 / _time(step, device, args.repeats)


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
    p.add_argument("--ppo-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = bench_generation(args, device)
    ppo = bench_ppo(args, device)
    print(
        f"device={device} threads={torch.get_num_threads()} B={args.batch_size} P={args.prompt_len} "
        f"N={args.new_tokens} llama(hidden={args.hidden}, layers={args.layers}, vocab={args.vocab})"
    )
    print(f"greedy outputs identical: {bool(gen['identical'])}")
    print("| measurement | lightning_llm | transformers | ratio |")
    print("|---|---|---|---|")
    print(
        f"| generation tokens/s | {gen['ours_tok_s']:.0f} | {gen['hf_tok_s']:.0f} | "
        f"{gen['ours_tok_s'] / gen['hf_tok_s']:.2f}x |"
    )
    print(
        f"| PPO iterations/s (B={args.ppo_batch}, N=8, 4 epochs x 2 minibatches) | {ppo:.2f} | n/a (TRL has no PPO) | - |"
    )


if __name__ == "__main__":
    main()
