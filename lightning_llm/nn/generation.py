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

from lightning_llm.ops import token_logprobs


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
    """Left-pad token lists into ``(B, P)`` ids and a ``(B, P)`` mask (a tensor is taken as already left-padded)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.numel() == 0:
            raise ValueError(
                "`prompts` must be a non-empty (B, P) tensor of token ids with B >= 1 and P >= 1, received shape"
                f" {tuple(prompts.shape)}. Fix: give every prompt at least one token (e.g. the BOS id)."
            )
        return prompts.to(device), torch.ones_like(prompts, device=device)
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        raise ValueError(
            "`prompts` must be a non-empty list of non-empty token lists, received "
            f"{'an empty list' if len(prompts) == 0 else f'empty prompts at rows {empty[:5]}'}."
            " Fix: give every prompt at least one token (e.g. the BOS id)."
        )
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Validate sampling settings: ``temperature >= 0`` (0 = greedy), ``top_k`` None/0 (off) or a positive int,
    ``top_p`` None or in ``(0, 1]`` (1 = off). Raises ``ValueError``/``TypeError`` naming the argument and the fix."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(
            f"`temperature` must be a number >= 0 (0 = greedy), received {temperature!r}."
            " Fix: use 0 for greedy decoding or a positive value (1.0 = the model's distribution) for sampling."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(
            f"`top_k` must be None or 0 (no top-k filtering) or a positive int, received {top_k!r}."
            " Fix: pass e.g. top_k=50, or None to sample from the whole vocabulary."
        )
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0
    ):
        raise ValueError(
            f"`top_p` must be None or a number in (0, 1] (1 = no nucleus filtering), received {top_p!r}."
            " Fix: pass e.g. top_p=0.9; for greedy decoding use temperature=0 instead of top_p=0."
        )


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with cumulative probability >= top_p to -inf.

    ``top_k`` None or 0 and ``top_p`` None or 1 leave the logits unchanged; other values are checked by
    :func:`check_sampling`.
    """
    check_sampling(1.0, top_k, top_p)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step from next-token logits ``(B, V)``: ``(token (B,), logprob (B,) float32)``.

    ``temperature == 0`` takes the argmax; otherwise a token is drawn from ``softmax(filter_logits(logits / T))``.
    ``logprob`` is the chosen token's log-probability under ``softmax(logits / T)`` (before filtering; ``T = 1`` when
    greedy), the quantity PPO rescores.
    """
    logits = logits.float()  # (B, V)
    if temperature == 0:
        token = logits.argmax(-1)
    else:
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, token_logprobs(logits, token, temperature=temperature or 1.0)


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
        temperature: 0 for greedy; otherwise logits are divided by it before sampling (>= 0).
        top_k: sample among the ``top_k`` most likely tokens; None or 0: no top-k filtering.
        top_p: nucleus sampling, in ``(0, 1]``; None or 1: no nucleus filtering.
        eos_id: stop a row after it emits this id.
        pad_id: id written after a row has stopped, and used for left padding.
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        use_cache: False recomputes the whole sequence at every step (the reference the tests compare with).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"`max_new_tokens` must be an int >= 1, received {max_new_tokens!r}. Fix: ask for at least one new token."
        )
    check_sampling(temperature, top_k, top_p)
    device = model.wte.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    if prompt_mask is not None:
        if tuple(prompt_mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"`prompt_mask` must have the shape of the prompts {tuple(ids.shape)}, received"
                f" {tuple(prompt_mask.shape)}. Fix: pass the (B, P) attention mask of the left-padded prompt tensor."
            )
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
        token, logprob = sample_next(_last_logits(model, hidden), temperature, top_k, top_p, generator)  # (B,), (B,)
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
