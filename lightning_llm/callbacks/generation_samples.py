"""``GenerationSamples``: log sample completions of fixed prompts while training.

Every ``every_n_steps`` steps each prompt is encoded, continued for ``max_new_tokens`` tokens and decoded; the
samples are logged as text (W&B table / TensorBoard text / MLflow artifact, and ``<log_dir>/samples.txt``). Decoding
recomputes the full sequence at each step through ``forward_fn`` (works for any model; prompts are short), greedy by
default or sampled with ``temperature`` / ``top_k`` from a generator seeded with ``seed``, so the same weights
always give the same samples. Generation stops at ``eos_id``. From YAML nothing is required: the prompts default to
:data:`DEFAULT_PROMPTS` and the tokenizer to the module's or the datamodule's.

Notation: P prompt tokens, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_llm.callbacks._utils import (
    ForwardFn,
    PeriodicCallback,
    check_every,
    default_forward_fn,
    eval_mode,
    log_text,
    model_max_length,
    resolve_tokenizer,
)
from lightning_llm.nn.generation import check_sampling, sample_next

#: prompts used when none are given (the embedded corpus is Python's documentation)
DEFAULT_PROMPTS = ("The Python interpreter", "A list is", "def main(")


@torch.no_grad()
def sample_tokens(
    forward_fn: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Continue ``prompt`` (token ids) one token at a time from ``forward_fn(ids (1, P+n)) -> logits (1, P+n, V)``."""
    ids = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = ids[-max_length:] if max_length else ids
        logits = forward_fn(torch.tensor([window], device=device))[:, -1].cpu()  # (1, V)
        token = int(sample_next(logits, temperature, top_k, None, generator)[0])
        ids.append(token)
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new


class GenerationSamples(PeriodicCallback):
    """Log completions of ``prompts`` every ``every_n_steps`` training steps (and at the end of training).

    Args:
        prompts: the prompts (text).
        tokenizer: ``encode(text) -> ids``, ``decode(ids) -> text`` and optionally ``eos_id``, or a tokenizer directory;
            default: the module's, else the datamodule's (resolved at the first sample).
        every_n_steps: period in training steps.
        max_new_tokens: tokens generated per prompt.
        temperature: 0 = greedy; otherwise sampling temperature.
        top_k: sample among the k most likely tokens.
        forward_fn: ``(module, input_ids) -> logits``.
        max_length: keep at most this many tokens as the model's input (models with a position limit).
        seed: seed of the sampling generator (reset at every logging step).
        key: log key.

    Attributes:
        samples: ``[(step, [(prompt, completion)])]``.
    """

    def __init__(
        self,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        tokenizer: Any = None,
        every_n_steps: int = 500,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        forward_fn: ForwardFn | None = None,
        max_length: int | None = None,
        seed: int = 0,
        key: str = "samples",
    ) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of strings (wrap a single prompt in a list).")
        check_every("every_n_steps", every_n_steps)
        check_sampling(temperature, top_k)
        self.prompts, self.tokenizer, self.forward_fn = list(prompts), tokenizer, forward_fn or default_forward_fn
        self.every_n_steps, self.key, self.seed = every_n_steps, key, seed
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.max_length = max_length
        self.samples: list[tuple[int, list[tuple[str, str]]]] = []

    def generate(self, pl_module: L.LightningModule) -> list[tuple[str, str]]:
        """``[(prompt, completion)]`` from the module's current weights."""
        gen = torch.Generator().manual_seed(self.seed)
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = resolve_tokenizer(self.tokenizer, getattr(pl_module, "_trainer", None), pl_module,
                                               "GenerationSamples")  # fmt: skip
        if self.max_length is None:
            self.max_length = model_max_length(pl_module)
        eos = getattr(self.tokenizer, "eos_id", None)
        out = []
        with eval_mode(pl_module):
            for prompt in self.prompts:
                ids = self.tokenizer.encode(prompt)
                if not ids:
                    ids = [eos if eos is not None else 0]
                new = sample_tokens(
                    lambda x: self.forward_fn(pl_module, x),
                    ids,
                    self.max_new_tokens,
                    self.temperature,
                    self.top_k,
                    eos,
                    gen,
                    self.max_length,
                    pl_module.device,
                )
                out.append((prompt, self.tokenizer.decode(new)))
        return out

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        pairs = self.generate(pl_module)
        self.samples.append((step, pairs))
        text = "\n\n".join(f"PROMPT: {p}\nCOMPLETION: {c}" for p, c in pairs)
        log_text(trainer, self.key, text, step)

    def on_due_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_once(trainer, pl_module)
