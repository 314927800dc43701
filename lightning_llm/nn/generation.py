"""Batched autoregressive decoding with a KV cache.

Notation: B batch, P padded prompt length, N new tokens, V vocabulary, S_max cache capacity.

Prompts of different lengths are LEFT-padded to P so every row's next token sits in the last column; positions come
from the attention mask, so padding changes nothing. One prefill pass fills the cache, then each step feeds one token
per row. A row stops after it emits ``eos_id`` or when the ``stop`` callable says so (stop strings, token
sequences: any test on the tokens generated so far); it then receives ``pad_id`` and a 0 in the response mask.
Greedy decoding (``temperature=0``) equals recomputing the full sequence at every step and Hugging Face's greedy
``generate`` (tested).

Design of the decoding loop (:func:`generate`), for speed at the small shapes of RL rollouts, where a step of eager
PyTorch is mostly Python and kernel-launch overhead:

* **one step graph** (:func:`_decode_step`): after the prefill, every step writes its token's keys/values at a
  slot given as a tensor and attends over the slots written so far (a view of the preallocated cache, no copy), so
  the step has no host-side shape logic: compiled (``compile=True``), ``torch.compile(dynamic=False)`` with only
  the number of slots read and the cache capacity marked dynamic builds one graph per batch size, whatever the
  prompt widths and generation lengths;
* **preallocated outputs**: tokens, log-probabilities and masks are written into ``(B, P + N)`` / ``(B, N)`` buffers,
  no ``torch.cat`` per step; the cache itself is reused between calls on the CPU (:func:`_static_cache`);
* **sampling without filtering ops** when top-k / top-p are off (:func:`sample_next`);
* **input-major weights while decoding on the CPU** (:func:`input_major_linear_weights`): BLAS multiplies a few rows
  by a contiguous matrix faster than by a transposed one (a tied output projection reads an input-major copy);
* **few host reads**: only the all-finished test, every :func:`finished_check_interval` steps (and whatever a
  ``stop`` callable reads: it runs on the host after every step).

Sharded models (FSDP2, tensor parallelism) and dynamic-NTK RoPE keep the model's own ``forward`` with a growing cache
(:func:`static_decoding_supported`), which gives the same tokens.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightning_llm.nn.attention import AttentionInputs
from lightning_llm.nn.kv_cache import KVCache
from lightning_llm.nn.rope import rope_cos_sin
from lightning_llm.ops import is_plain, log_softmax_gather


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: ``(B, P + N)`` left-padded prompts followed by generated tokens.
        attention_mask: ``(B, P + N)`` 1 on real prompt tokens and on generated tokens up to and including EOS.
        prompt_length: P, the padded prompt width; ``sequences[:, P:]`` are the responses.
        response_mask: ``(B, N)`` 1 on generated tokens up to and including EOS.
        logprobs: ``(B, N)`` log-probabilities of the chosen tokens under the sampling distribution (after
            temperature, before top-k/top-p filtering), 0 where ``response_mask`` is 0; None when :func:`generate`
            was called with ``return_logprobs=False``.
        finished: ``(B,)`` True where the row emitted EOS or ``stop`` stopped it.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None
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
    lengths = torch.tensor([len(p) for p in prompts])  # (B,)
    width = int(lengths.max())
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long)  # every token, row after row
    # token j of row i goes to column width - len_i + j: one scatter, not one copy per row
    mask = (torch.arange(width)[None] >= (width - lengths)[:, None]).long()  # (B, P)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    ids[mask.bool()] = flat  # boolean indexing visits rows in order, columns left to right
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
    return_logprob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoding step from next-token logits ``(B, V)``: ``(token (B,), logprob (B,) float32)`` (``logprob``
    None with ``return_logprob=False``: a greedy step then runs no softmax at all).

    ``temperature == 0`` takes the argmax; otherwise a token is drawn from ``softmax(filter_logits(logits / T))``.
    ``logprob`` is the chosen token's log-probability under ``softmax(logits / T)`` (before filtering; ``T = 1`` when
    greedy), the quantity PPO rescores: :func:`lightning_llm.ops.log_softmax_gather`, the kernel of
    :func:`lightning_llm.ops.token_logprobs` (one ``(B, V)`` row block needs no chunking). With top-k and top-p off
    no filtering op runs at all (no sort, no top-k): the draw is ``multinomial(softmax(logits / T))``.
    """
    logits = logits.float()  # (B, V)
    scaled = logits if temperature in (0, 1) else logits / temperature  # (B, V)
    if temperature == 0:
        token = logits.max(-1).indices  # the first maximum, as argmax (both documented), ~3x faster on CPU
    else:
        if top_k or (top_p is not None and top_p < 1.0):
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
        else:
            probs = scaled.softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logprob = log_softmax_gather(scaled, token) if return_logprob else None  # (B,)
    return token, logprob


def _last_logits(model, hidden: torch.Tensor, out_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Project only the last position's hidden state ``(B, C)`` to float32 logits ``(B, V)`` (with ``out_weight``,
    the output matrix in another layout, when given: :func:`input_major_linear_weights`).

    The prefill never materialises ``(B, P, V)`` logits (``B * P * V`` floats: gigabytes for long prompts and large
    vocabularies); Hugging Face's ``generate`` does the same with ``logits_to_keep=1``.
    """
    return model.logits(hidden, weight=out_weight).float()  # (B, V)


#: the leading tokens that left-padded prompts share run once (:func:`prefill`) when that spares at least this many
#: token positions of the prefill; below it the extra forward passes and the cache copies cost about what they save
#: (an eager forward call of a small model costs about as much as 30-60 tokens of it on a CPU)
SHARED_PREFIX_MIN_TOKENS = 64
#: leading tokens compared when looking for a shared beginning (the comparison holds B x B x this many booleans)
SHARED_PREFIX_MAX_COMPARED = 4096


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, cache: KVCache, share_prefix: bool = True) -> torch.Tensor:
    """Run the prompts ``(B, P)`` through the model into ``cache`` (filling its first P slots, ``length`` = P) and
    return the last position's hidden states ``(B, C)``.

    Work that several rows share runs once:

    * **identical rows** (the same ids and mask: GRPO / RLOO draw several completions per prompt, the harness repeats
      a request): the U distinct prompts fill a U-row cache whose slots are then copied to every row that repeats
      them. The forward costs U rows instead of B (Hugging Face's ``generate(num_return_sequences=G)`` runs all B).
    * **a shared beginning** (:func:`_shared_prefix`: few-shot examples, a task description or a system prompt that
      prompts start with): its L tokens run once as one row, their keys and values are copied into each sharing row
      at that row's offset (:meth:`KVCache.copy_slots`), and the forward continues from the first column where one
      of them leaves the shared tokens, ``c0`` = (their least left padding) + L: ``L + k (P - c0)`` token positions
      for the k sharing rows instead of ``k P``. Rows that do not share it (the few-shot examples of the first
      documents differ: the harness leaves a document out of its own examples) run apart, and may share another
      beginning; each part fills a cache of its own, copied into ``cache`` (:meth:`KVCache.put_rows`).

    Every row gets the keys, values and logits it would get alone, up to the float rounding of another batch
    composition (tested against full recomputation). ``share_prefix=False`` (:func:`generate` on sharded models and
    dynamic-NTK RoPE) keeps one forward pass: FSDP2 and tensor parallelism need the same number of forward calls on
    every rank, and dynamic-NTK RoPE gives a prefix run alone other angles than the whole prompt.
    """
    b, p = ids.shape
    if b > 1:
        rows, inverse = torch.unique(torch.cat((ids, mask.to(ids.dtype)), dim=1), dim=0, return_inverse=True)
        if rows.shape[0] < b:
            once = model.new_kv_cache(rows.shape[0], p, dtype=cache.k[0].dtype)  # U rows, P slots
            hidden = prefill(model, rows[:, :p], rows[:, p:], once, share_prefix)  # (U, C): may share a start
            cache.copy_rows(once, inverse)
            return hidden.index_select(0, inverse)  # (B, C)
        shared = _shared_prefix(ids, mask) if share_prefix else None
        if shared is not None:
            group, length = shared
            if len(group) < b:  # the sharing rows and the others apart, each into a cache of its own
                order = group + sorted(set(range(b)) - set(group))
                parts = []
                for rows_of_part in (order[: len(group)], order[len(group) :]):
                    idx = torch.as_tensor(rows_of_part, device=ids.device)
                    sub = model.new_kv_cache(len(rows_of_part), p, dtype=cache.k[0].dtype)
                    parts.append(prefill(model, ids[idx], mask[idx], sub, share_prefix))  # (k, C)
                    cache.put_rows(sub, idx)
                back = torch.as_tensor(order, device=ids.device).argsort()  # row r's place in ``order``
                return torch.cat(parts).index_select(0, back)  # (B, C)
            pads = p - mask.sum(1)  # (B,)
            first = int(pads[0])
            prefix = model.new_kv_cache(1, length, dtype=cache.k[0].dtype)
            model(ids[:1, first : first + length], kv_cache=prefix, return_hidden=True)
            c0 = int(pads.min()) + length
            slots = (torch.arange(c0, device=ids.device)[None] - pads[:, None]).clamp(min=0)  # (B, c0)
            cache.copy_slots(prefix, slots)  # left padding gets position 0's keys: masked, and finite
            return model(ids[:, c0:], attention_mask=mask, kv_cache=cache, return_hidden=True)[:, -1]
    return model(ids, attention_mask=mask, kv_cache=cache, return_hidden=True)[:, -1]


def _shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[int], int] | None:
    """``(rows, L)``: the rows of the left-padded prompts ``(B, P)`` that begin with the same L tokens, chosen to
    spare the most prefill positions (``k c0 - L`` for k rows, :func:`prefill`), when that is at least
    :data:`SHARED_PREFIX_MIN_TOKENS`; else None. A row shares at most all its tokens but the last, so that it keeps a
    token of its own after the shared ones. Prompts whose mask is not zeros then ones (not left-padded) share
    nothing.

    Every pair's common beginning comes from one comparison of the rows aligned at their first real token
    (``(B, B, min(P, SHARED_PREFIX_MAX_COMPARED))`` booleans); then, for each row, the rows ranked by how much they
    share with it give the candidate groups (the k best share the k-th's length).
    """
    b, p = ids.shape
    lengths = mask.sum(1)  # (B,)
    pads = p - lengths
    real = torch.arange(p, device=ids.device)[None] >= pads[:, None]  # (B, P) where a left-padded mask is 1
    if not torch.equal(real, mask.bool()):
        return None
    m = min(p, SHARED_PREFIX_MAX_COMPARED)
    k = torch.arange(m, device=ids.device)[None]  # (1, M)
    aligned = ids.gather(1, (pads[:, None] + k).clamp(max=p - 1))  # (B, M): each row from its first real token
    own = -1 - torch.arange(b, device=ids.device)[:, None]  # (B, 1) a value no other row holds (ids are >= 0)
    aligned = torch.where(k < lengths[:, None] - 1, aligned, own)  # a row's last token and beyond: its own
    differ = aligned[:, None, :] != aligned[None, :, :]  # (B, B, M)
    ends = torch.ones((b, b, 1), dtype=torch.bool, device=ids.device)
    common = torch.cat((differ, ends), dim=-1).to(torch.uint8).argmax(-1).tolist()  # (B, B) first difference
    pads = pads.tolist()
    best, chosen = SHARED_PREFIX_MIN_TOKENS - 1, None
    for i in range(b):
        order = sorted(range(b), key=lambda j: -common[i][j])  # row i itself first: it shares all it may
        least_pad = pads[i]
        for n in range(2, b + 1):
            length = common[i][order[n - 1]]  # what the n best share with row i, and so with each other
            if length == 0:
                break
            least_pad = min(least_pad, pads[order[n - 1]])
            spared = n * (least_pad + length) - length
            if spared > best:
                best, chosen = spared, (sorted(order[:n]), length)
    return chosen


# ---------------------------------------------------------------------------------------------------- static decoding
_COMPILE_BACKEND = "inductor"  # the tests' fast sibling traces with "aot_eager" (no C++ build)
_compiled_steps: dict = {}  # device type -> torch.compile(_decode_step), built on first use
_compile_error: str | None = None  # set when compiling failed once: every later call decodes eagerly


def _decode_step(
    model,
    cache: KVCache,
    ids: torch.Tensor,
    slot: torch.Tensor,
    key_ok: torch.Tensor,
    base_pos: torch.Tensor,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    out_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step: float32 next-token logits ``(B, V)`` of ``ids`` ``(B, 1)`` written at ``slot``.

    The new keys/values go to ``slot`` (a ``(1,)`` long tensor, :meth:`KVCache.write`) and attention reads the first
    ``S = key_ok.shape[1]`` slots of the ``(B, G, S_max, D)`` cache, the ones written so far, with the boolean mask
    ``key_ok & (slot index <= slot)`` (``key_ok`` ``(B, S)``: False on left padding). Nothing depends on a host
    integer: compiled, ``S`` and ``S_max`` are the graph's only dynamic sizes (:class:`_Stepper` marks them), so
    ``torch.compile(dynamic=False)`` builds one graph per batch size. Reading the written slots only, rather than
    the whole preallocated cache through a mask, matters on the CPU, where the cached keys and values come from
    memory at every step: at the harness benchmark's 256-token generations (16 rows, 4 x 256 GPT-2) the compiled
    step reading the whole cache took 1.34 s a batch, 1.04 s reading the written slots (eager: 1.17 s); the
    written slots average about 60% of the capacity there. Positions are ``base_pos + slot``
    (``base_pos`` ``(B, 1)`` = real prompt tokens - P, which reproduces the mask-cumsum positions of
    :meth:`Transformer.attention_inputs`). ``rope_cos, rope_sin`` ``(B, 1, R)`` are this step's RoPE angles, computed
    by the caller with :func:`rope_cos_sin` for all steps at once: gathered inside the graph, Inductor inlines the
    gather into the attention's reduction loop and redoes it for every key (kernel profile at the rollout benchmark's
    size: 360 instead of 115 microseconds per layer). The greedy argmax stays outside the graph: inside, Inductor's
    argmax loop over the harness benchmark's 16 x 8192 logits cost about 270 microseconds a step more than the eager
    ``max`` it replaced (90 microseconds).
    """
    s_max = key_ok.shape[1]
    slots = torch.arange(s_max, device=ids.device)  # (S,)
    mask = (key_ok & (slots <= slot))[:, None, None, :]  # (B, 1, 1, S): written slots, no padding
    q_pos = base_pos + slot  # (B, 1)
    cache.pos.index_copy_(1, slot, q_pos)  # key positions (ALiBi)
    inputs = AttentionInputs(
        cos=rope_cos,
        sin=rope_sin,
        mask=mask,
        q_pos=q_pos,
        k_pos=cache.pos[:, :s_max],
        is_causal=False,
        cache_slot=slot,
    )
    hidden = model.hidden_states(ids, inputs, cache)[:, -1]  # (B, C)
    return _last_logits(model, hidden, out_weight)  # (B, V)


def static_decoding_supported(model) -> bool:
    """Whether :func:`generate` can use the fixed-shape decode step for ``model``.

    It needs a :class:`~lightning_llm.nn.transformer.Transformer` with plain (unsharded) parameters: FSDP2 and tensor
    parallelism run their communication in the module's ``forward`` hooks, which the step bypasses. Dynamic-NTK RoPE
    changes its base with the sequence length (a host-side value at every step), so it keeps the growing cache too.
    Both fall back to the growing cache, which gives the same tokens.
    """
    if not callable(getattr(model, "hidden_states", None)) or not callable(getattr(model, "new_kv_cache", None)):
        return False
    scaling = getattr(model.config, "rope_scaling", None)
    if model.config.pos_encoding == "rope" and scaling is not None and scaling.get("type") == "dynamic":
        return False
    return all(is_plain(p) for p in model.parameters())


def finished_check_interval(device: torch.device) -> int:
    """Steps between the host reads of "have all rows emitted EOS?" in :func:`generate`: 1 on the CPU, where the read
    costs a microsecond (no queue of kernels to drain) and stopping at the earliest step saves the most; 8 elsewhere,
    where each read waits for every queued kernel. The output is cut at the step where the last row finished either
    way, so the interval changes the work done after that, never the result."""
    return 1 if device.type == "cpu" else 8


@contextlib.contextmanager
def input_major_linear_weights(model: torch.nn.Module):
    """While decoding on the CPU: every plain ``nn.Linear`` weight holds the same values stored input-major; yields
    the output projection to pass to ``model.logits(..., weight=)``: an input-major copy of a tied embedding matrix
    (``model.output_weight`` is ``wte.weight``: its rows must stay contiguous for the embedding lookup, so it is
    copied rather than swapped; measured at the harness benchmark's 8192 x 256, 16 rows: 608 vs 877 microseconds
    per product), else None (the model's own ``output_weight``, swapped with the other linear weights when it is one).

    Each weight keeps its shape ``(C_out, C_in)`` and its ``Parameter`` object; only its ``.data`` becomes
    ``w.t().contiguous().t()`` (memory ``(C_in, C_out)`` row-major) until the block exits, when the original storage
    is put back (also on an exception). ``F.linear`` then multiplies by a contiguous matrix (BLAS "NN") instead of a
    transposed one ("NT"): for the few rows of a decoding step MKL is much faster on NN (measured at the rollout
    benchmark's sizes, 16 rows: 11.3 vs 18.5 microseconds per product, 29 products per step), eager or compiled.
    The copy costs one pass over the weights per :func:`generate` call (they do not change while decoding) and, while
    it decodes, memory for a second copy of them (the original storage is kept to be put back). Skipped
    off the CPU (cuBLAS takes the transposed layout at full speed; the copy would only cost memory) and for tensor
    subclasses (DTensor). Weights shared by several layers are swapped once.
    """
    swapped: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        for m in model.modules():
            w = getattr(m, "weight", None)
            if type(m) is not torch.nn.Linear or id(w) in swapped or w.device.type != "cpu" or not is_plain(w):
                continue
            swapped[id(w)] = (w, w.data)
            w.data = w.data.t().contiguous().t()
        out = getattr(model, "output_weight", None)
        tied = out is not None and id(out) not in swapped and out.device.type == "cpu" and is_plain(out)
        yield out.detach().t().contiguous().t() if tied else None
    finally:
        for w, data in swapped.values():
            w.data = data


_cache_pool: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, KVCache), CPU only


def _static_cache(model, batch: int, capacity: int) -> KVCache:
    """The preallocated cache of a static decode: the one the model's previous CPU decode of the same shapes used, if
    any, else a new one (kept for the next call).

    Reusing it saves the allocation and, on the CPU, the page faults of touching fresh memory: large allocations
    come straight from the operating system each time (measured 1.1 ms of a 24 ms GRPO-benchmark generation for
    0.5 MB of cache). It is zeroed before reuse, so stale values never meet a mask (0 * NaN would be NaN). A call
    takes the cache out of the pool while it decodes (:func:`generate` puts it back), so concurrent calls on one
    model never share one. The pool holds at most one cache per model, dropped with the model; accelerators have a
    caching allocator and keep no pool.
    """
    w = model.wte.weight
    key = (batch, capacity, w.dtype, w.device)
    if w.device.type == "cpu":
        entry = _cache_pool.pop(model, None)
        if entry is not None and entry[0] == key:
            cache = entry[1]
            for t in (*cache.k, *cache.v, cache.pos):
                t.zero_()
            cache.length = 0
            return cache
    return model.new_kv_cache(batch, capacity)


def _release_static_cache(model, cache: KVCache) -> None:
    w = model.wte.weight
    if w.device.type == "cpu":
        key = (cache.pos.shape[0], cache.max_length, w.dtype, w.device)
        _cache_pool[model] = (key, cache)


class _Stepper:
    """Runs :func:`_decode_step` for one :func:`generate` call: eagerly, or compiled.

    Compiled (``generate(compile=True)``): ``torch.compile(_decode_step, dynamic=False, fullgraph=True)``, built once
    per process and device type. Every call marks the cache capacity (``S_max``, the KV buffers' third dimension)
    and the number of slots read (``key_ok``'s second) dynamic (``torch._dynamo.mark_dynamic``), so Dynamo keeps one
    graph per batch size and model: new prompt widths and generation lengths reuse it (before, with every size
    static, each cache capacity cost a compilation of 10-30 s, and Dynamo's limit of 8 graphs a function sent
    further shapes to eager decoding). On the CPU with Inductor the graph gets a C++ wrapper (``cpp_wrapper``): for
    small models the Python wrapper that launches each kernel, checks strides and allocates buffers costs as much as
    many of the kernels (a whole generation at the GRPO benchmark's size, timed under cProfile: 30.8 ms with the
    Python wrapper, 27.5 ms with the C++ one); building it adds about 15 s to the first compilation. An exception at the first step of a call (where
    Dynamo compiles, or checks its guards) is taken for a compiler failure: warned about once per process, and
    decoding goes on eagerly with the same results (a genuine error then recurs eagerly and propagates). Later steps
    run the graph that first step chose, and their exceptions propagate.
    """

    def __init__(self, model, compile: bool, device: torch.device) -> None:
        self.model = model
        self.first = True
        self.step = _decode_step
        if compile and _compile_error is None:
            self.step = _compiled_steps.get(device.type)
            if self.step is None:
                options = None
                if _COMPILE_BACKEND == "inductor" and device.type == "cpu":
                    options = {"cpp_wrapper": True}
                self.step = _compiled_steps[device.type] = torch.compile(
                    _decode_step, backend=_COMPILE_BACKEND, dynamic=False, fullgraph=True, options=options
                )

    def __call__(
        self, cache: KVCache, ids: torch.Tensor, slot: torch.Tensor, key_ok: torch.Tensor, *args
    ) -> torch.Tensor:
        """One step; ``key_ok`` ``(B, S)``: the slots written after it (see :func:`_decode_step`)."""
        global _compile_error
        first, self.first = self.first, False
        if self.step is _decode_step:
            return _decode_step(self.model, cache, ids, slot, key_ok, *args)
        torch._dynamo.mark_dynamic(key_ok, 1)
        if not first:
            return self.step(self.model, cache, ids, slot, key_ok, *args)
        for t in (*cache.k, *cache.v):
            torch._dynamo.mark_dynamic(t, 2)
        torch._dynamo.mark_dynamic(cache.pos, 1)
        try:
            return self.step(self.model, cache, ids, slot, key_ok, *args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: warn once, decode eagerly
            _compile_error = f"{type(err).__name__}: {err}"
            self.step = _decode_step
            warnings.warn(
                f"generate(compile=True): torch.compile of the decode step failed ({_compile_error.splitlines()[0]}); "
                "decoding eagerly from now on (same tokens, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
            return _decode_step(self.model, cache, ids, slot, key_ok, *args)


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
    compile: bool = False,
    stop: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | Sequence[bool]] | None = None,
    return_logprobs: bool = True,
) -> GenerationOutput:
    """Generate continuations for a batch of prompts.

    Decoding paths (all give the same greedy tokens; tested):

    * **static** (the default for a :class:`~lightning_llm.nn.transformer.Transformer`,
      :func:`static_decoding_supported`): one prefill forward fills a preallocated KV cache, then every step runs
      :func:`_decode_step`, whose shapes never change (it attends over the whole cache with a mask); tokens,
      log-probabilities and masks go into preallocated ``(B, N)`` buffers (no ``torch.cat`` per step); with
      ``eos_id`` the all-finished test reads one flag back per step on CPU (no queue to drain there) and every 8
      steps on accelerators (each read would wait for the queued kernels; every step with ``stop``), the output then
      cut at the step where the last row finished.
    * **growing cache** (sharded models, dynamic-NTK RoPE): the model's ``forward`` with ``kv_cache=`` at every step.
    * **no cache** (``use_cache=False``): the whole sequence recomputed at every step, the reference of the tests.

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
        compile: ``torch.compile`` the static decode step (``fullgraph=True``): one graph per batch size, for every
            prompt width and generation length (:class:`_Stepper`). The first call per batch size pays the
            compilation (tens of seconds on CPU); later calls reuse it. If compiling fails, a warning is issued
            once and decoding continues eagerly. Sampling (``torch.multinomial`` with ``generator``) stays outside
            the graph, so seeded draws follow the same random stream as eager decoding.
        stop: a test that ends rows early, beside ``eos_id``: after every step, ``stop(responses, finished)`` gets
            the ``(B, i + 1)`` tokens generated so far (a view: read it, do not keep it; rows stopped earlier hold
            ``pad_id`` after their last token) and the ``(B,)`` bool ``finished`` (rows already stopped, EOS of this
            step included: nothing to test there), and returns ``(B,)`` booleans (a tensor on any device, or a
            list): True stops that row after this step's token, exactly as if it were EOS (kept, with a 1 in the
            response mask; ``pad_id`` and 0 afterwards; ``finished`` True). The output is cut where the last row
            stopped. A callable rather than stop token sequences because a stop *string* (lm-evaluation-harness's
            ``until``) is not a token sequence: it can end inside a token, or be spelled by several tokenizations,
            so only the decoded text decides; this module stays tokenizer-free, the caller decodes. It runs on the
            host, outside the compiled step; on accelerators it costs one device-to-host read per step, so with a
            ``stop`` the all-finished test is read every step too (the read is paid anyway).
        return_logprobs: False leaves ``logprobs`` None and skips the log-softmax of every step (callers that want
            only the tokens, such as the harness's ``generate_until``: about 2% of a greedy step on the CPU at the
            harness benchmark's sizes).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"`max_new_tokens` must be an int >= 1, received {max_new_tokens!r}. Fix: ask for at least one new token."
        )
    check_sampling(temperature, top_k, top_p)
    if not isinstance(compile, bool):
        raise TypeError(
            f"`compile` must be a bool, received {compile!r}. Fix: True compiles the decode step, False decodes eagerly."
        )
    if not isinstance(return_logprobs, bool):
        raise TypeError(
            f"`return_logprobs` must be a bool, received {return_logprobs!r}. Fix: True returns the chosen tokens' "
            "log-probabilities, False only the tokens."
        )
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
    n_new = max_new_tokens
    cfg = model.config
    if cfg.pos_encoding == "learned" and p + n_new > cfg.block_size:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {n_new} exceeds the learned position table "
            f"(block_size={cfg.block_size}); shorten the prompt or lower max_new_tokens."
        )
    was_training = model.training
    model.eval()
    # preallocated outputs: the full sequences and attention mask (prompt part filled now), per-step results
    seq = torch.full((b, p + n_new), pad_id, dtype=ids.dtype, device=device)  # (B, P + N)
    seq[:, :p] = ids
    seq_mask = torch.ones((b, p + n_new), dtype=torch.long, device=device)  # (B, P + N) what the model attends to
    seq_mask[:, :p] = mask
    logprobs = torch.zeros((b, n_new), dtype=torch.float32, device=device) if return_logprobs else None  # (B, N)
    response_mask = torch.ones((b, n_new), dtype=torch.long, device=device)  # (B, N)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stopping = eos_id is not None or stop is not None  # rows may stop before max_new_tokens
    check_every = 1 if stop is not None else finished_check_interval(device)
    static = use_cache and static_decoding_supported(model)
    cache = None
    if use_cache:
        capacity = p + n_new
        cache = _static_cache(model, b, capacity) if static else model.new_kv_cache(b, capacity)
    if static:
        step_fn = _Stepper(model, compile, device)
        key_ok = torch.ones((b, cache.max_length), dtype=torch.bool, device=device)  # (B, S_max)
        key_ok[:, :p] = mask.bool()
        base_pos = mask.sum(1, keepdim=True) - p  # (B, 1): position of slot s is base_pos + s
        slot = torch.full((1,), p, dtype=torch.long, device=device)  # the slot the next fed token goes to
        rope_cos = rope_sin = None
        if cfg.pos_encoding == "rope":  # per step, (N, B, 1, R): gathered here, not in the step (see _decode_step)
            positions = base_pos + torch.arange(p, p + n_new, device=device)  # (B, N)
            rope_cos, rope_sin = (
                t.transpose(0, 1)[:, :, None].contiguous()
                for t in rope_cos_sin(
                    positions, cfg.rope_dim, cfg.rope_base, cfg.rope_scaling, cfg.block_size, cfg.rope_layout
                )
            )
    layout = input_major_linear_weights(model) if static else contextlib.nullcontext()
    try:  # the model's mode and the pooled cache come back also when a step or ``stop`` raises
        with layout as out_weight:
            steps, token = 0, ids[:, -1]  # token: the one fed at the next step (set by each step)
            for i in range(n_new):
                if i == 0 and use_cache:  # prefill: the whole prompt through the model's forward
                    hidden = prefill(model, ids, mask, cache, share_prefix=static)  # (B, C)
                    logits = _last_logits(model, hidden, out_weight)
                elif static:
                    logits = step_fn(
                        cache,
                        token[:, None],
                        slot,
                        key_ok[:, : p + i],
                        base_pos,
                        None if rope_cos is None else rope_cos[i - 1],
                        None if rope_sin is None else rope_sin[i - 1],
                        out_weight,
                    )
                    slot.add_(1)
                elif use_cache:
                    step_mask = seq_mask[:, : p + i]  # (B, P + i)
                    hidden = model(token[:, None], attention_mask=step_mask, kv_cache=cache, return_hidden=True)[:, -1]
                    logits = _last_logits(model, hidden)
                else:
                    hidden = model(seq[:, : p + i], attention_mask=seq_mask[:, : p + i], return_hidden=True)[:, -1]
                    logits = _last_logits(model, hidden)
                token, logprob = sample_next(logits, temperature, top_k, top_p, generator, return_logprobs)  # (B,)
                if stopping:
                    token = token.masked_fill(finished, pad_id)
                    if logprobs is not None:
                        logprob = logprob.masked_fill(finished, 0.0)
                    response_mask[:, i] = ~finished
                    if eos_id is not None:
                        finished |= token == eos_id  # finished rows hold pad_id now (and stay finished)
                seq[:, p + i] = token
                if logprobs is not None:
                    logprobs[:, i] = logprob
                steps = i + 1
                if stop is not None:
                    finished |= torch.as_tensor(stop(seq[:, p : p + steps], finished.clone()), device=device).bool()
                if stopping and steps % check_every == 0 and bool(finished.all()):
                    break
    finally:
        model.train(was_training)
        if static:
            _release_static_cache(model, cache)
    n = steps
    if stopping and bool(finished.all()):  # cut after the step at which the last row finished
        n = int(response_mask[:, :steps].any(0).sum())  # columns with a live row: a prefix once all finish
    return GenerationOutput(
        sequences=seq[:, : p + n].contiguous(),
        attention_mask=torch.cat((mask, response_mask[:, :n]), dim=1),
        prompt_length=p,
        response_mask=response_mask[:, :n].contiguous(),
        logprobs=None if logprobs is None else logprobs[:, :n].contiguous(),
        finished=finished,
    )
