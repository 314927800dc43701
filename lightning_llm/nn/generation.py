"""Batched autoregressive decoding with a KV cache.

Notation: B batch, P padded prompt length, N new tokens, V vocabulary.

Prompts of different lengths are LEFT-padded to P so every row's next token sits in the last column; positions come
from the attention mask, so padding changes nothing. One prefill pass fills the cache, then each step feeds one token
per row. A row stops after it emits ``eos_id``; it then receives ``pad_id`` and a 0 in the response mask.
Greedy decoding (``temperature=0``) equals recomputing the full sequence at every step (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: ``(B, P + N)`` left-padded prompts followed by generated tokens.
        attention_mask: ``(B, P + N)`` 1 on real prompt tokens and on generated tokens up to and including EOS.
        prompt_length: P, the padded prompt width; ``sequences[:, P:]`` are the responses.
        response_mask: ``(B, N)`` 1 on generated tokens up to and including EOS.
        logprobs: ``(B, N)`` log-probabilities of the chosen tokens under the sampling distribution (after
            temperature, before top-k/top-p filtering), 0 where ``response_mask`` is 0.
        finished: ``(B,)`` True where the row emitted EOS.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def left_pad(
    prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(B, P)`` ids and a ``(B, P)`` mask."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return prompts.to(device), torch.ones_like(prompts, device=device)
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists; got an empty prompt.")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with cumulative probability >= top_p to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Project only the last position's hidden state ``(B, C)`` to float32 logits ``(B, V)``.

    The prefill never materialises ``(B, P, V)`` logits (``B * P * V`` floats: gigabytes for long prompts and large
    vocabularies); Hugging Face's ``generate`` does the same with ``logits_to_keep=1``.
    """
    return model.logits(hidden).float()  # (B, V)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> GenerationOutput:
    """Generate continuations for a batch of prompts.

    Args:
        model: a :class:`~lightning_llm.nn.transformer.Transformer`.
        prompts: list of token-id lists (left-padded here), or a ``(B, P)`` tensor already left-padded (then pass
            ``prompt_mask``).
        max_new_tokens: number of decoding steps at most.
        temperature: 0 for greedy; otherwise logits are divided by it before sampling.
        top_k, top_p: optional filtering of the sampling distribution.
        eos_id: stop a row after it emits this id.
        pad_id: id written after a row has stopped, and used for left padding.
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        use_cache: False recomputes the whole sequence at every step (the reference the tests compare with).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    device = model.wte.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    if prompt_mask is not None:
        mask = prompt_mask.to(device=device, dtype=torch.long)
    b, p = ids.shape
    cfg = model.config
    if cfg.pos_encoding == "learned" and p + max_new_tokens > cfg.block_size:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds the learned position table "
            f"(block_size={cfg.block_size}); shorten the prompt or lower max_new_tokens."
        )
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(b, p + max_new_tokens) if use_cache else None
    seq, seq_mask = ids, mask
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new_tokens, new_logprobs, new_mask = [], [], []
    step_ids = ids
    for _ in range(max_new_tokens):
        if use_cache:
            hidden = model(step_ids, attention_mask=seq_mask, kv_cache=cache, return_hidden=True)[:, -1]  # (B, C)
        else:
            hidden = model(seq, attention_mask=seq_mask, return_hidden=True)[:, -1]  # (B, C)
        logits = _last_logits(model, hidden)  # (B, V)
        if temperature == 0:
            token = logits.argmax(-1)
            logprob = torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        else:
            scaled = logits / temperature
            logp_all = torch.log_softmax(scaled, -1)
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            logprob = logp_all.gather(-1, token[:, None]).squeeze(-1)
        alive = ~finished
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        new_tokens.append(token)
        new_logprobs.append(torch.where(alive, logprob, torch.zeros_like(logprob)))
        new_mask.append(alive.long())
        if eos_id is not None:
            finished = finished | (alive & (token == eos_id))
        seq = torch.cat((seq, token[:, None]), dim=1)
        seq_mask = torch.cat((seq_mask, torch.ones_like(token)[:, None]), dim=1)
        step_ids = token[:, None]
        if bool(finished.all()):
            break
    model.train(was_training)
    response_mask = torch.stack(new_mask, dim=1)
    attention_mask = torch.cat((mask, response_mask), dim=1)
    return GenerationOutput(
        sequences=seq,
        attention_mask=attention_mask,
        prompt_length=p,
        response_mask=response_mask,
        logprobs=torch.stack(new_logprobs, dim=1),
        finished=finished,
    )
