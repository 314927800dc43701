"""Our models inside lm-evaluation-harness: :class:`HarnessLM`, an ``lm_eval.api.model.LM``.

Any model :func:`lightning_llm.loading.load_pretrained` reads (a Hugging Face directory, a ``.ckpt`` of any of our
LightningModules, a sharded checkpoint folder) or a module in memory runs the harness's tasks::

    import lm_eval
    from lightning_llm.evaluation import HarnessLM

    lm = HarnessLM("logs/checkpoints/last.ckpt", batch_size=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai", "arc_easy"])

or, after ``import lightning_llm.evaluation.harness``, ``simple_evaluate(model="lightning_llm",
model_args="pretrained=PATH")`` (the class is registered under ``lightning_llm``); from the shell, the harness's own
command line: ``python -m lightning_llm.evaluation.harness_cli --model lightning_llm --model_args pretrained=PATH
--tasks ...`` (:mod:`lightning_llm.evaluation.harness_cli`).

What is computed is the harness's own definition (the same requests give the same numbers as its ``HFLM``, tested):

* ``loglikelihood``: ``TemplateLM`` tokenizes (trailing context spaces move to the continuation; an empty context is
  the prefix token); the input is ``(context + continuation)[-(max_length + 1):][:-1]`` and the last
  ``len(continuation)`` positions are scored; ``is_greedy`` = argmax equals the continuation at every position.
* ``loglikelihood_rolling``: the harness's disjoint rolling windows (``get_rolling_token_windows`` with
  ``context_len=1``) after the prefix token, summed.
* ``generate_until``: the context is left-truncated to ``max_length - max_gen_toks`` tokens, decoded greedily (or
  sampled with ``do_sample``), cut at the first stop sequence (the ``until`` list plus the EOS text).

How it is computed is ours:

* **One forward per distinct prefix.** Under causal attention the hidden state at position ``j`` depends only on
  tokens ``<= j``, so a request whose model input is a prefix of another's (identical inputs; the choices of a
  multiple-choice question that share the question and differ in a one-token answer; a short choice inside a longer
  one) is scored from the longer row at its own positions. The harness's ``HFLM`` shares only single-token
  continuations of one context.
* **One forward per context for multi-token continuations.** Where the continuations of one context would still need
  several rows (the choices of a multiple-choice question with multi-token answers: HellaSwag, ARC, PIQA), the
  context runs once into a KV cache and each continuation runs over a copy of its cached keys and values
  (:meth:`HarnessLM._score_contexts`): ``P + sum(n_i - 1)`` tokens instead of ``sum(P + n_i - 1)``. Positions follow
  the attention mask, so every row still sees exactly its own input (tested against ``HFLM`` and against the Hugging
  Face model's logits). Requests longer than ``max_length`` (left-truncated, so their contexts differ) keep the
  path above.
* **A shared beginning once.** Few-shot examples taken by the ``first_n`` sampler (MMLU-style tasks), a task
  description or a system prompt put the same tokens before many requests. Where the rows of a batch begin with L
  shared tokens, those run once as one row: the plain path reads them through a
  :class:`~lightning_llm.nn.kv_cache.SharedPrefixCache` (:meth:`HarnessLM._shared_columns`), the contexts of
  multi-token continuations and the prompts of generation through :func:`lightning_llm.nn.generation.prefill`
  (which copies them into each row's cache). ``L + B (T - L)`` positions instead of ``B T``, used where that spares
  at least :data:`~lightning_llm.nn.generation.SHARED_PREFIX_MIN_TOKENS` (tested against ``HFLM``).
* **Batches cut where the padding is.** Rows sorted by length (longest first) are split into batches of at most
  ``batch_size`` rows by a dynamic programme minimising padded tokens plus a per-forward cost (:func:`_partition`):
  on CPU a batch is cut wherever that saves more than :data:`CPU_FORWARD_OVERHEAD_TOKENS` padded tokens, and holds at
  most :data:`CPU_FORWARD_MAX_TOKENS` (the cost per token grows past it); on accelerators it is cut only where that
  saves a whole row.
* **Logits only where scored.** The final hidden states are projected to the vocabulary ONLY at the scored positions
  (our Transformer's ``return_hidden``; a full ``(B, T, V)`` log-softmax is what ``HFLM`` computes), a cache-sized
  chunk of rows at a time, log-probabilities from the one chunked kernel :func:`lightning_llm.ops.token_logprobs`;
  the greedy check (an argmax over the vocabulary: 1.7x the log-softmax's time on CPU, measured) runs only for
  ``loglikelihood`` (``loglikelihood_rolling`` returns no ``is_greedy``).
* **Generation** groups requests by generation settings, sorts them by length (full batches) and decodes each
  left-padded batch with :func:`lightning_llm.nn.generation.generate` (preallocated KV cache, fixed-shape decode
  step, compiled with ``compile=True``; greedy = the first maximum, as Hugging Face's ``generate``). Its ``stop``
  hook checks the stop sequences on the newest tokens of the rows still running (:meth:`HarnessLM._stop_test`), so
  a row stops at its first stop sequence and the batch as soon as every row has met one.

**Chat templates** (``simple_evaluate(apply_chat_template=True)``, ``--apply_chat_template``, with
``fewshot_as_multiturn``): the conversation is rendered as the model's data modules render it (one resolution,
:func:`lightning_llm.data.preference.resolve_chat_template`): the ``chat_template`` argument (a Jinja string), else the
Jinja template of the Hugging Face tokenizer the model or tokenizer directory carries (rendered as ``transformers``
renders it, which is what ``HFLM`` calls: the same prompts, tested), else this project's default format
(``"{role}: {content}\\n"`` per message, ``"assistant: "`` as the generation prompt: what ``SFTDataModule`` trains
on when its tokenizer has no template). As in ``HFLM``, a template that rejects the system role is retried without it.

**Data parallel.** When a ``torch.distributed`` process group with more than one process is initialised (or the
process was launched by ``torchrun`` and ``distributed`` is not False: one is then initialised here, ``gloo`` on CPU,
``nccl`` on CUDA with ``cuda:LOCAL_RANK``), every request-level call shards its batches across the ranks (costliest
first, each to the least-loaded rank, by padded tokens), each rank scores its share and the results are gathered to every rank in
the original order: every rank returns exactly what one process would (same batches, so the same numbers). The
harness's own sharding (``LM.rank`` / ``world_size``) is deliberately NOT used (both stay 0 / 1): it splits documents
by index, pads ranks with duplicate requests and gathers metrics only to rank 0, in a rank-dependent order; lm-eval
documents the alternative used here ("model methods receive all requests and can handle distribution internally").
``simple_evaluate`` still returns its results only where ``LOCAL_RANK`` is 0 (``None`` elsewhere).

Notation: B batch, T tokens, C width, V vocabulary, K scored positions in a batch.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_llm._dist import ended_at_exit
from lightning_llm.evaluation.lm import LanguageModel, resolve_model
from lightning_llm.nn.generation import SHARED_PREFIX_MIN_TOKENS, prefill, static_decoding_supported
from lightning_llm.nn.kv_cache import SharedPrefixCache
from lightning_llm.ops import chunk_rows, token_logprobs

try:  # lm-eval is an optional extra
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "HarnessLM needs lm-evaluation-harness: `pip install 'lm-eval>=0.4.5'` (it is in the `test` extra)."
    ) from _err

__all__ = ["DEFAULT_MAX_LENGTH", "HarnessLM"]

DEFAULT_MAX_LENGTH = 2048
"""Context length used when the model has no position limit (RoPE, ALiBi): the harness's own default."""

CPU_FORWARD_OVERHEAD_TOKENS = 64
"""Fixed cost of one forward pass on CPU, in tokens, for :func:`_partition`. Measured on a 2-core x86 CPU with a
4 x 256 GPT-2: ~70 us per token and ~1 ms of dispatch per forward (~16 tokens) on one thread; with several threads
every op also synchronises them (much more when another process holds a core), hence 64. (The cost per token is flat
in the rows only up to a few thousand tokens a forward: :data:`CPU_FORWARD_MAX_TOKENS`.)"""

CPU_FORWARD_MAX_TOKENS = 2048
"""Most padded tokens in one forward pass on CPU (a single longer row still goes alone), for :func:`_partition`.

On CPU the cost per token grows with the tokens of a forward once its activations outgrow the caches (measured on
a 2-core AVX-512 x86 CPU, one thread, 4 x 256 GPT-2: 65-73 microseconds per token up to ~800 tokens a forward, 84-95
from 3200 on, whatever the rows x width). In situ, the harness benchmark's 38 rolling documents of ~700 tokens:
3.37-3.45 s with 2048 (19 forwards) against 3.59-3.66 s without a limit (8 forwards) and 3.50-3.53 s with 1024 (38);
1.79 against 1.88-1.89 s on two threads; its 300 LAMBADA requests (~90 tokens) batch as before."""

_Row = tuple[list[int], list[tuple[int, list[int]]]]  # (input ids, [(first scored position, targets)])


def _is_ours(module: nn.Module) -> bool:
    from lightning_llm.nn.transformer import Transformer

    return isinstance(module, Transformer)


def _partition(
    widths: Sequence[int], max_rows: int, overhead: float, max_tokens: float = math.inf
) -> list[tuple[int, int]]:
    """Split rows sorted by width, longest first, into consecutive batches ``[start, end)`` of at most ``max_rows``
    rows and at most ``max_tokens`` padded tokens (a single row may exceed it).

    Minimises ``sum(rows x width of the batch's first row) + overhead x number of batches`` exactly (dynamic
    programme over the cut points, ``O(n x max_rows)``): the padded tokens computed plus each forward's fixed cost
    in tokens. ``overhead=inf``: the fewest batches, then the least padding (with no token limit: the plain cut every
    ``max_rows`` rows).
    """
    n = len(widths)
    if math.isinf(overhead):
        if math.isinf(max_tokens):
            return [(s, min(s + max_rows, n)) for s in range(0, n, max_rows)]
        overhead = float(sum(widths) * max_rows + 1)  # one batch more costs more than any padding
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows), end):
            if end - start > 1 and (end - start) * widths[start] > max_tokens:
                continue
            cost = best[start] + (end - start) * widths[start] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    spans = []
    end = n
    while end > 0:
        spans.append((cut[end], end))
        end = cut[end]
    return spans[::-1]


def _assign(costs: Sequence[float], world: int) -> list[int]:
    """Rank of each unit of work: the costliest first, each to the least-loaded rank (ties to the lowest rank); the
    same on every rank, as it depends only on ``costs``."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _entry_sums(
    logp: torch.Tensor, miss: torch.Tensor, seg: torch.Tensor, n_entries: int, greedy: bool
) -> list[tuple[float, bool]]:
    """Per entry, the summed log-probability of its positions (``seg`` ``(K,)``: the entry of each) and whether
    none of them missed the argmax (False without ``greedy``)."""
    sums = torch.zeros(n_entries, dtype=logp.dtype).index_add_(0, seg, logp.cpu())  # (E,)
    misses = torch.zeros(n_entries).index_add_(0, seg, miss.cpu())  # (E,)
    return [(float(s), greedy and m == 0) for s, m in zip(sums.tolist(), misses.tolist())]


def _fingerprint(units: Sequence[Any]) -> str:
    """A digest of the work units (token ids, settings), to check that every rank was handed the same requests."""
    h = hashlib.sha1()
    for unit in units:
        h.update(repr(unit).encode())
    return h.hexdigest()


@register_model("lightning_llm", "lightning-llm")
class HarnessLM(TemplateLM):
    """An lm-evaluation-harness model backed by our loader, batching, KV cache and chunked log-probabilities.

    Args:
        pretrained: a path :func:`~lightning_llm.loading.load_pretrained` reads, a module in memory (our
            ``Transformer``, a LightningModule holding one, a Hugging Face causal LM, any ``ids -> logits`` module)
            or a :class:`~lightning_llm.evaluation.LanguageModel`.
        tokenizer: a :class:`~lightning_llm.data.Tokenizer`, or a tokenizer directory; default: the model's own.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available (``cuda:LOCAL_RANK`` under ``torchrun``).
        dtype: parameter dtype (``"bfloat16"``...); default: as stored.
        batch_size: most rows per forward pass (the harness's ``"auto"`` is read as 16).
        max_length: longest model input in tokens; default: the model's position limit, else 2048 (the harness's).
        max_gen_toks: default number of new tokens for ``generate_until`` when a task sets none (harness: 256).
        add_bos_token: force the tokenizer's special tokens on (True) or off (False); default: the tokenizer's
            own template, as the harness does.
        seed: seeds sampling in ``generate_until`` tasks with ``do_sample: true`` (each batch draws from its own
            generator seeded with ``seed`` and the batch's index, so samples do not depend on the number of ranks).
        distributed: shard requests across the ranks of a ``torch.distributed`` process group. None (default): when
            one with more than one process is initialised, or launched by ``torchrun`` (one is then initialised);
            True: the same, but an error when there is none; False: never (every process scores everything).
        chat_template: the Jinja chat template ``apply_chat_template`` renders conversations with (the harness's
            ``apply_chat_template=True``), or a :class:`~lightning_llm.data.preference.ChatTemplate`; default: the
            template of the Hugging Face tokenizer in the ``tokenizer`` (else ``pretrained``) directory, else this
            project's default format (the module docstring). Resolved at the first conversation.
        compile: ``generate_until`` decodes with the ``torch.compile``-d step (``generate(compile=True)``): the same
            tokens, each step faster, but every new (batch size, cache capacity) shape costs a compilation first
            (15-30 s on a CPU, once per process); worth it only for long generations. Default False.
        **kwargs: the harness's extra model arguments (``max_batch_size``...), accepted and ignored.

    Attributes:
        work: what this process computed, summed over calls: ``batches`` (forward passes of whole inputs, prompts
            included), their ``rows`` and padded ``tokens``, and the one-token ``decode_steps`` of generation; under
            data parallelism, this rank's share. Scoring counts the positions that ran (a shared beginning once);
            generation counts rows x padded prompt width as handed to the prefill, which may run fewer (repeated
            rows and a shared beginning once, :func:`~lightning_llm.nn.generation.prefill`).
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | nn.Module | LanguageModel,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        seed: int = 1234,
        distributed: bool | None = None,
        chat_template: Any = None,
        compile: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if batch_size in (None, "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 16
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.") from None
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if max_length is not None and int(max_length) < 2:
            raise ValueError(f"`max_length` must be an int >= 2 (tokens), got {max_length!r}.")
        if distributed not in (None, True, False):
            raise ValueError(
                f"`distributed` must be None (auto), True or False, got {distributed!r}; None shards requests when "
                "a torch.distributed process group is initialised or the process was launched by torchrun."
            )
        if not isinstance(compile, bool):
            raise ValueError(f"`compile` must be True or False, got {compile!r}.")
        from lightning_llm.data.preference import ChatTemplate

        if chat_template is not None and not isinstance(chat_template, (str, ChatTemplate)):
            raise ValueError(
                f"`chat_template` must be None (the tokenizer's own template), a Jinja template string or a "
                f"ChatTemplate, got {type(chat_template).__name__}: {chat_template!r}."
            )
        self._chat_arg = chat_template
        self._chat: ChatTemplate | None = None
        launched = _launched_by_torchrun()
        if device is None and launched and distributed is not False and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per rank, as accelerate does
        self.lm, tok = resolve_model(pretrained, tokenizer, device, dtype)
        if tok is None:
            raise ValueError(
                "`tokenizer` is required: the model carries none. Pass the tokenizer it was trained with (a "
                "directory saved by Tokenizer.save, a Hugging Face tokenizer directory, or a Tokenizer object)."
            )
        self.tokenizer = tok
        # where a Hugging Face tokenizer's own chat template may be read: a local directory only (no hub lookups);
        # a Tokenizer object names the directory it was loaded from (Tokenizer.source)
        candidates = (tokenizer, getattr(tok, "source", None), pretrained, self.lm.source)
        sources = [s for s in candidates if isinstance(s, (str, os.PathLike))]
        self._chat_source = next((str(s) for s in sources if os.path.isdir(os.path.expanduser(s))), None)
        self.module = self.lm.module
        self.ours = _is_ours(self.module)
        # prompts' shared beginnings run once (generation's prefill, _score, _score_contexts): plain weights only
        self._share_prefix = self.ours and static_decoding_supported(self.module)
        self._max_length = int(max_length) if max_length is not None else (self.lm.max_length or DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = batch_size
        self.add_bos_token = add_bos_token
        self.seed = seed
        self.compile = compile
        self.pad_id = int(getattr(tok, "pad_id", None) or tok.eos_id)
        self.work = {"batches": 0, "rows": 0, "tokens": 0, "decode_steps": 0}
        self._distributed = distributed
        if distributed is not False:
            self._init_process_group(required=bool(distributed), launched=launched)

    # ------------------------------------------------------------------ facts the harness asks for
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", None) or type(self.tokenizer).__name__).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """What the harness records about the model."""
        return {
            "model_name": self.lm.name,
            "model_num_parameters": self.lm.num_parameters(),
            "backend": "lightning_llm",
        }

    @property
    def conversation_template(self):
        """The :class:`~lightning_llm.data.preference.ChatTemplate` conversations are rendered with (the class
        docstring's ``chat_template``), resolved once."""
        if self._chat is None:
            from lightning_llm.data.preference import ChatTemplate, resolve_chat_template

            arg = self._chat_arg
            if isinstance(arg, ChatTemplate):
                self._chat = arg
            else:
                tok = self.tokenizer if hasattr(self.tokenizer, "id_to_token") else None
                self._chat = resolve_chat_template(arg, self._chat_source, tok)
        return self._chat

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja template the harness records and hashes (``simple_evaluate(apply_chat_template=...)``): None
        when templates are off (False / None), as ``HFLM``; the default format as Jinja when there is no template."""
        if chat_template is False or chat_template is None:
            return None
        from lightning_llm.data.preference import DEFAULT_CHAT_TEMPLATE

        return self.conversation_template.template or DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as one prompt string, as ``HFLM`` renders it: ``add_generation_prompt`` opens the
        assistant's turn; without it the last (assistant) message is left open to be continued
        (``continue_final_message``). A template that raises on the system role is retried without it."""
        import jinja2

        def render(history: list[dict[str, str]]) -> str:
            return self.conversation_template.apply_chat_template(
                history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            return render([m for m in chat_history if m.get("role") != "system"])

    # ------------------------------------------------------------------ tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; ``add_special_tokens=None`` uses the tokenizer's own template (as the harness's
        ``HFLM`` does), unless ``string`` already starts with the prefix token's text."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if flag is None:
            flag = not string.startswith(self.tok_decode([self.prefix_token_id], skip_special_tokens=False) or "\0")
        backend = getattr(self.tokenizer, "backend", None)
        if backend is not None:
            ids = backend.encode(string, add_special_tokens=bool(flag)).ids
        else:  # a tokenizer without a backend template
            ids = self.tokenizer.encode(string)
        left = kwargs.get("left_truncate_len")
        return list(ids[-left:]) if left else list(ids)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ data parallel
    def _init_process_group(self, required: bool, launched: bool) -> None:
        """Use the initialised process group; under ``torchrun`` without one, initialise it (gloo on CPU, nccl on
        CUDA), as ``HFLM``'s accelerate does; ``required`` and neither: a clear error."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return
        if launched and dist.is_available():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with ended_at_exit():  # ours to end: a gloo group left to finalization can abort the process
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            return
        if required:
            raise ValueError(
                "`distributed=True` needs a torch.distributed process group, but none is initialised and the process "
                "was not launched by torchrun (WORLD_SIZE > 1, MASTER_ADDR). Launch with `torchrun --nproc_per_node "
                "N ...`, call torch.distributed.init_process_group() first, or pass distributed=None / False."
            )

    def _group(self) -> tuple[int, int]:
        """``(rank, world_size)`` requests are sharded over; ``(0, 1)`` when not sharding."""
        if self._distributed is False:
            return 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _map(self, units: list[Any], costs: list[float], fn: Callable[[Any], Any]) -> list[Any]:
        """``[fn(u) for u in units]``, with the units shared across the ranks and the results gathered to all.

        Every rank must pass the same units (checked by a digest); a failure on one rank is raised on every rank
        (after the one collective), so no rank waits forever for another.
        """
        rank, world = self._group()
        if world == 1:
            return [fn(u) for u in units]
        import torch.distributed as dist

        owner = _assign(costs, world)
        mine: dict[int, Any] = {}
        error = None
        try:
            for i, unit in enumerate(units):
                if owner[i] == rank:
                    mine[i] = fn(unit)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised here
            error = f"{type(err).__name__}: {err}"
            local = err
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (_fingerprint(units), mine, error))
        failed = [(r, g[2]) for r, g in enumerate(gathered) if g[2] is not None]
        if failed:
            message = f"HarnessLM: rank {failed[0][0]} failed while scoring its share of the requests: {failed[0][1]}"
            if error is not None:
                raise RuntimeError(message) from local
            raise RuntimeError(message)
        if len({g[0] for g in gathered}) > 1:
            raise RuntimeError(
                "HarnessLM: the ranks were handed different requests, so their shares do not add up. Give every rank "
                "the same tasks, limit and seeds (simple_evaluate's random_seed / numpy_random_seed / "
                "fewshot_random_seed), or pass distributed=False to score every request on every process."
            )
        merged: dict[int, Any] = {}
        for _, part, _ in gathered:
            merged.update(part)
        return [merged[i] for i in range(len(units))]

    def _count(self, rows: int, width: int) -> None:
        self.work["batches"] += 1
        self.work["rows"] += rows
        self.work["tokens"] += rows * width

    # ------------------------------------------------------------------ scoring
    def _batches(self, widths: list[int]) -> list[tuple[int, int]]:
        """Batches of rows sorted by width (longest first): :func:`_partition` with the device's forward cost."""
        if self.device.type == "cpu":
            return _partition(widths, self.batch_size, CPU_FORWARD_OVERHEAD_TOKENS, CPU_FORWARD_MAX_TOKENS)
        return _partition(widths, self.batch_size, self.max_length)

    def _score(self, rows: list[_Row], greedy: bool = True) -> list[list[tuple[float, bool]]]:
        """Score a batch of rows: per row, per entry ``(first position p, targets)``, the summed log-probability of
        ``targets[j]`` given the input up to position ``p + j`` and whether every target is the argmax (``greedy``;
        False skips the argmax and reports False)."""
        b = len(rows)
        width = max(len(ids) for ids, _ in rows)
        inp = torch.full((b, width), self.pad_id, dtype=torch.long)  # (B, T) right-padded
        r_idx: list[int] = []
        c_idx: list[int] = []
        tgt: list[int] = []
        seg: list[int] = []  # entry number of each scored position
        n_entries = 0
        for i, (ids, entries) in enumerate(rows):
            inp[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            for start, targets in entries:
                n = len(targets)
                r_idx.extend([i] * n)
                c_idx.extend(range(start, start + n))
                tgt.extend(targets)
                seg.extend([n_entries] * n)
                n_entries += 1
        rows_t = torch.as_tensor(r_idx, dtype=torch.long)  # (K,)
        cols_t = torch.as_tensor(c_idx, dtype=torch.long)  # (K,)
        seg_t = torch.as_tensor(seg, dtype=torch.long)  # (K,)
        targets = torch.as_tensor(tgt, dtype=torch.long)  # (K,)
        with torch.no_grad():
            if self.ours:
                dev = self.device
                x = inp.to(dev)
                shared = self._shared_columns(inp, min(c_idx))
                cache = None
                if shared:  # the rows' common first columns run once, as one row (see _shared_columns)
                    prefix = self.module.new_kv_cache(1, shared, device=dev)
                    self.module(x[:1, :shared], kv_cache=prefix, return_hidden=True)
                    self._count(1, shared)
                    cache = SharedPrefixCache(prefix, b, width - shared)
                hidden = self.module(x[:, shared:], kv_cache=cache, return_hidden=True)  # (B, T - L, C)
                self._count(b, width - shared)
                sel = hidden[rows_t.to(dev), cols_t.to(dev) - shared]  # (K, C): only the scored positions
                logp, miss = self._project(sel, targets.to(dev), greedy)
            else:
                self._count(b, width)
                logits = self.lm.logits(inp)[rows_t, cols_t]  # (K, V)
                logp = token_logprobs(logits, targets)  # (K,) float32
                miss = (logits.argmax(dim=-1) != targets).to(torch.float32)  # (K,)
        flat = _entry_sums(logp, miss, seg_t, n_entries, greedy)
        out, e = [], 0
        for _, entries in rows:
            out.append(flat[e : e + len(entries)])
            e += len(entries)
        return out

    def _shared_columns(self, inp: torch.Tensor, first_scored: int) -> int:
        """How many leading columns of the right-padded batch ``inp`` ``(B, T)`` :meth:`_score` runs once: L, the
        tokens every row begins with (few-shot examples taken by the harness's ``first_n`` sampler, a task
        description, a system prompt), when no scored position lies among them and sharing spares at least
        :data:`~lightning_llm.nn.generation.SHARED_PREFIX_MIN_TOKENS` positions (``(B - 1) L``); else 0.

        The L columns run as one row into a cache that the whole batch then reads
        (:class:`~lightning_llm.nn.kv_cache.SharedPrefixCache`): ``L + B (T - L)`` positions instead of ``B T``,
        and one row's prefix in memory. Not on sharded models and dynamic-NTK RoPE (:attr:`_share_prefix`). A pad
        column never counts: right padding starts after a row's last token, and a scored position lies before it.
        """
        b = inp.shape[0]
        if b < 2 or not self._share_prefix:
            return 0
        m = min(first_scored, inp.shape[1])
        same = (inp[:, :m] == inp[:1, :m]).all(0).long()  # (m,)
        length = int(same.cumprod(0).sum())
        return length if (b - 1) * length >= SHARED_PREFIX_MIN_TOKENS else 0

    def _project(self, hidden: torch.Tensor, targets: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-probability (K,), 1.0 where the target is not the argmax (K,))`` of ``targets`` ``(K,)`` given
        our model's final hidden states ``(K, C)``, projected to the vocabulary a cache-sized chunk of rows at a
        time (the misses stay 0 without ``greedy``)."""
        k = targets.shape[0]
        logp = torch.empty(k, dtype=torch.float32, device=hidden.device)  # (K,)
        miss = torch.zeros(k, dtype=torch.float32, device=hidden.device)  # (K,)
        step = chunk_rows(self.module.config.vocab_size, hidden.device)  # a (k, V) logits chunk stays cache-sized
        for s in range(0, k, step):
            z = self.module.logits(hidden[s : s + step])  # (k, V)
            logp[s : s + step] = token_logprobs(z, targets[s : s + step])
            if greedy:
                miss[s : s + step] = (z.argmax(dim=-1) != targets[s : s + step]).float()
        return logp, miss

    def _score_contexts(
        self, groups: list[tuple[list[int], list[list[int]]]], greedy: bool = True
    ) -> list[list[tuple[float, bool]]]:
        """Score groups of continuations that share one context: per group ``(context, [continuation, ...])``, per
        continuation its summed log-probability and greedy flag (:meth:`_score`'s quantities).

        The contexts run once, left-padded into one KV cache; the first token of every continuation is scored from
        its context's last hidden state, and the rest of each continuation (its tokens but the last, right-padded)
        runs over a copy of its context's cached keys and values, batched as :meth:`_batches` cuts them. Positions
        follow the attention mask, so a row sees exactly ``context + continuation[:-1]``: the input the harness
        defines for it (:meth:`_loglikelihood_tokens`). Memory: the contexts' cache (``G x layers x P x C`` keys and
        as many values) is held while their continuations run, beside one batch's copy of it.
        """
        dev, model = self.device, self.module
        g, pc = len(groups), max(len(ctx) for ctx, _ in groups)
        ids = torch.full((g, pc), self.pad_id, dtype=torch.long)  # (G, P) left-padded contexts
        mask = torch.zeros((g, pc), dtype=torch.long)  # (G, P)
        for i, (ctx, _) in enumerate(groups):
            ids[i, pc - len(ctx) :] = torch.as_tensor(ctx, dtype=torch.long)
            mask[i, pc - len(ctx) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        rows = [(i, cont) for i, (_, conts) in enumerate(groups) for cont in conts]  # one entry per continuation
        with torch.no_grad():
            cache = model.new_kv_cache(g, pc)
            last = prefill(model, ids, mask, cache, self._share_prefix)  # (G, C): a shared beginning runs once
            self._count(g, pc)
            hidden = [last[torch.as_tensor([i for i, _ in rows], device=dev)]]  # the first target of every row
            targets = [cont[0] for _, cont in rows]
            seg = list(range(len(rows)))
            long = sorted((r for r, (_, cont) in enumerate(rows) if len(cont) > 1), key=lambda r: -len(rows[r][1]))
            for start, end in self._batches([pc + len(rows[r][1]) - 1 for r in long]):  # what each row attends over
                chunk = long[start:end]
                ts = len(rows[chunk[0]][1]) - 1  # longest first: the chunk's suffix width
                owner = torch.as_tensor([rows[r][0] for r in chunk], device=dev)
                suffix = torch.full((len(chunk), ts), self.pad_id, dtype=torch.long)  # (R, T) right-padded
                suffix_mask = torch.zeros((len(chunk), ts), dtype=torch.long)  # (R, T)
                for j, r in enumerate(chunk):
                    cont = rows[r][1]
                    suffix[j, : len(cont) - 1] = torch.as_tensor(cont[:-1], dtype=torch.long)
                    suffix_mask[j, : len(cont) - 1] = 1
                    targets.extend(cont[1:])
                    seg.extend([r] * (len(cont) - 1))
                rows_cache = model.new_kv_cache(len(chunk), pc + ts)
                rows_cache.copy_rows(cache, owner)  # each row starts from its context's cached keys and values
                suffix_mask = suffix_mask.to(dev)
                full_mask = torch.cat((mask.index_select(0, owner), suffix_mask), dim=1)  # (R, P + T)
                h = model(suffix.to(dev), attention_mask=full_mask, kv_cache=rows_cache, return_hidden=True)
                self._count(len(chunk), ts)
                hidden.append(h[suffix_mask.bool()])  # (K_chunk, C): row by row, position by position
            sel = torch.cat(hidden)  # (K, C)
            logp, miss = self._project(sel, torch.as_tensor(targets, dtype=torch.long, device=dev), greedy)
        flat = _entry_sums(logp, miss, torch.as_tensor(seg, dtype=torch.long), len(rows), greedy)
        out, e = [], 0
        for _, conts in groups:
            out.append(flat[e : e + len(conts)])
            e += len(conts)
        return out

    def _context_groups(self, requests: list[tuple[Any, list[int], list[int]]]) -> dict[tuple[int, ...], list[int]]:
        """Requests to score by :meth:`_score_contexts`: context -> request indices, for each context (untruncated
        inputs only) whose continuations would otherwise need several forward rows, each repeating the context
        (the choices of a multiple-choice question with multi-token answers), and at least as long as those rows'
        continuation tokens on average: the saving must outweigh the second forward pass and the cache copies
        (rolling windows share a one-token context with long continuations: not worth it). Where one row holds them
        all (the continuations but one are prefixes of it: one-token choices) the plain path is as cheap and keeps
        them."""
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (_key, ctx, cont) in enumerate(requests):
            if ctx and len(ctx) + len(cont) <= self.max_length + 1:
                by_ctx.setdefault(tuple(ctx), []).append(i)
        groups = {}
        for ctx, members in by_ctx.items():
            inputs = sorted({tuple(requests[i][2][:-1]) for i in members})  # what each row adds to the context
            rows = sum(1 for a, b in zip(inputs, inputs[1:]) if b[: len(a)] != a) + 1  # prefixes ride along
            if rows > 1 and len(ctx) * len(inputs) >= sum(len(t) for t in inputs):
                groups[ctx] = members
        return groups

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        greedy: bool = True,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Score ``(cache_key, context_ids, continuation_ids)`` requests (the harness's token-level entry point).

        Each request's model input is ``full[:-1]`` with ``full = (context + continuation)[-(max_length + 1):]``
        and its ``n`` scored positions are the last ones of that input. Continuations of one context that would
        need several rows run over that context's KV cache (:meth:`_context_groups`, :meth:`_score_contexts`); the
        other inputs are grouped by prefix (one forward for an input and every input it starts with; see the module
        docstring). Identical entries are scored once.
        """
        for i, (_key, ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                raise ValueError(
                    f"request {i} ({str(_key)[:80]!r}) has an empty continuation after tokenization; every "
                    "continuation needs at least one token."
                )
            if len(ctx) + len(cont) < 2:
                raise ValueError(f"request {i}: nothing to condition on (context and continuation are one token).")
        out: list[tuple[float, bool] | None] = [None] * len(requests)

        def put(i: int, score: tuple[float, bool]) -> None:
            out[i] = score
            if requests[i][0] is not None:  # rolling windows carry no cache key
                self.cache_hook.add_partial("loglikelihood", requests[i][0], score)

        shared = self._context_groups(requests) if self.ours else {}
        if shared:
            contexts = sorted(shared, key=lambda c: (-len(c), c))  # longest first: each batch's first sets P
            conts = {c: sorted({tuple(requests[i][2]) for i in shared[c]}) for c in contexts}  # distinct ones
            spans = self._batches([len(c) for c in contexts])
            units = [[(list(c), [list(t) for t in conts[c]]) for c in contexts[a:b]] for a, b in spans]
            costs = [(b - a) * len(contexts[a]) + sum(len(t) - 1 for c in contexts[a:b] for t in conts[c])
                     for a, b in spans]  # fmt: skip
            for (a, b), unit_scores in zip(spans, self._map(units, costs, lambda u: self._score_contexts(u, greedy))):
                for c, scores in zip(contexts[a:b], unit_scores):
                    by_cont = dict(zip(conts[c], scores))
                    for i in shared[c]:
                        put(i, by_cont[tuple(requests[i][2])])
        inputs: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}  # input -> targets -> requests
        grouped = {i for members in shared.values() for i in members}
        for i, (_key, ctx, cont) in enumerate(requests):
            if i in grouped:
                continue
            full = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            n = min(len(cont), len(full) - 1)
            inputs.setdefault(tuple(full[:-1]), {}).setdefault(tuple(full[-n:]), []).append(i)
        # an input that is a prefix of another is scored inside it: in lexicographic order, an input that is a
        # prefix of any other is a prefix of the next one
        ordered = sorted(inputs)
        host = list(range(len(ordered)))
        for j in range(len(ordered) - 2, -1, -1):
            a, b = ordered[j], ordered[j + 1]
            if len(a) <= len(b) and b[: len(a)] == a:
                host[j] = host[j + 1]
        rows: dict[int, list[tuple[int, tuple[int, ...]]]] = {}  # host -> [(input index, targets)]
        for j, inp in enumerate(ordered):
            for targets in inputs[inp]:
                rows.setdefault(host[j], []).append((j, targets))
        order = sorted(rows, key=lambda h: (-len(ordered[h]), h))  # longest first: each batch's first row sets T
        hosts = [order[start:end] for start, end in self._batches([len(ordered[h]) for h in order])]
        units = [
            [(list(ordered[h]), [(len(ordered[j]) - len(t), list(t)) for j, t in rows[h]]) for h in batch]
            for batch in hosts
        ]
        costs = [len(batch) * len(ordered[batch[0]]) for batch in hosts]  # padded tokens
        scores = self._map(units, costs, lambda batch: self._score(batch, greedy=greedy))
        for batch, batch_scores in zip(hosts, scores):
            for h, row_scores in zip(batch, batch_scores):
                for (j, targets), score in zip(rows[h], row_scores):
                    for i in inputs[ordered[j]][targets]:
                        put(i, score)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over the harness's disjoint rolling windows: the windows of all
        documents are scored together (one sort, one batching), without the greedy check."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[Any, list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        if windows:
            for r, (logp, _greedy) in zip(owner, self._loglikelihood_tokens(windows, greedy=False)):
                totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of the contexts, cut at the first stop sequence (``until`` plus the EOS text)."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        if not requests:
            return []
        if not self.ours:
            names = sorted({getattr(r, "task_name", None) or "?" for r in requests})
            raise ValueError(
                f"task(s) {names} need `generate_until` (free-form generation), which HarnessLM runs with our "
                f"KV-cache decoder on a lightning_llm Transformer; the model is a {type(self.module).__name__}. Pass "
                "its path (a Hugging Face directory or a checkpoint is converted by load_pretrained), or run only "
                "loglikelihood / multiple_choice / loglikelihood_rolling tasks."
            )
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        units, costs, stops_of = [], [], []
        for members in groups.values():
            kwargs = dict(normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_new
            if max_ctx < 1:
                raise ValueError(
                    f"task {requests[members[0]].task_name!r} asks for max_gen_toks={max_new} new tokens, but the "
                    f"model reads at most max_length={self.max_length}; lower the task's generation_kwargs."
                    "max_gen_toks or raise HarnessLM(max_length=...) (RoPE / ALiBi models)."
                )
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sampling = (temperature, kwargs.get("top_k"), kwargs.get("top_p"))
            enc = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] or [self.prefix_token_id] for i in members}
            order = sorted(members, key=lambda i: (-len(enc[i]), i))
            for start in range(0, len(order), self.batch_size):  # full batches: see the docstring of _generate
                batch = order[start : start + self.batch_size]
                units.append((len(units), [enc[i] for i in batch], max_new, until, sampling))
                costs.append(len(batch) * (len(enc[batch[0]]) + max_new))
                stops_of.append((batch, until))
        texts = self._map(units, costs, lambda unit: self._generate(*unit))
        out: list[str | None] = [None] * len(requests)
        for (batch, until), batch_texts in zip(stops_of, texts):
            for i, text in zip(batch, batch_texts):
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]

    def _generate(
        self,
        index: int,
        prompts: list[list[int]],
        max_new: int,
        until: list[str],
        sampling: tuple[float, int | None, float | None],
    ) -> list[str]:
        """One left-padded batch through :func:`~lightning_llm.nn.generation.generate`: each row stops at EOS or at
        its first stop sequence (:meth:`_stop_test`), the batch when every row has stopped.

        Batches stay full (``batch_size`` rows, not :meth:`_batches`' padding-driven cuts): a decoding step costs
        about the same for 1 or 16 rows (measured on CPU: ~4 ms, the time of ~60 prompt tokens), so fewer, fuller
        batches beat less padding in the prompts.
        """
        from lightning_llm.nn.generation import generate

        temperature, top_k, top_p = sampling
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(self.seed + 1_000_003 * index)
        stops = [s for s in until if s]
        out = generate(
            self.module,
            prompts,
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=self.eot_token_id,
            pad_id=self.pad_id,
            generator=generator,
            compile=self.compile,
            stop=self._stop_test(stops) if stops else None,
            return_logprobs=False,
        )
        self._count(len(prompts), out.prompt_length)
        self.work["decode_steps"] += out.responses.shape[1] - 1
        lengths = out.response_mask.sum(1).tolist()  # each row's tokens up to its EOS / stop, inclusive
        return [self.tok_decode(row[:n]) for row, n in zip(out.responses.tolist(), lengths)]

    def _stop_test(self, stops: list[str]) -> Callable[[torch.Tensor, torch.Tensor], list[bool]]:
        """``generate``'s ``stop``: True for each running row whose text contains one of ``stops``.

        At each step only the text of a row's newest tokens is decoded, all running rows in one call of the Rust
        backend (:meth:`_decode_many`): a window of the longest stop's UTF-8 bytes + 4 tokens (a token that adds text
        adds at least one byte, byte-level BPE and byte fallback alike; the 4 spare tokens keep the stop clear of a
        character or a word-start space cut at the window's start). A hit there is confirmed on the row's whole
        text. The window decides only when a row stops; the text is cut at its first stop sequence afterwards either
        way (``postprocess_generated_text``). Measured at the harness benchmark's 16 rows and 256 tokens, stops
        ``["\\n", "<|endoftext|>"]``: 0.25 ms a step decoding row by row (once per stop string, a window of 4 x the
        characters), against 0.05 ms in one call of a 17-token window.
        """
        window = max(len(s.encode("utf-8")) for s in stops) + 4

        def stop(responses: torch.Tensor, finished: torch.Tensor) -> list[bool]:
            whole = responses.shape[1] <= window
            hits = [False] * responses.shape[0]
            running = [r for r, done in enumerate(finished.tolist()) if not done]
            if not running:
                return hits
            for r, text in zip(running, self._decode_many(responses[running, -window:].tolist())):
                if any(s in text for s in stops):
                    hits[r] = whole or any(s in self.tok_decode(responses[r].tolist()) for s in stops)
            return hits

        return stop

    def _decode_many(self, rows: list[list[int]]) -> list[str]:
        """``[tok_decode(row) for row in rows]``, in one call of the tokenizer's Rust backend when it has one."""
        backend = getattr(self.tokenizer, "backend", None)
        if callable(getattr(backend, "decode_batch", None)):
            return backend.decode_batch(rows, skip_special_tokens=True)
        return [self.tok_decode(row) for row in rows]


def _launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (its environment variables are set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ and "RANK" in os.environ
