"""Our models inside lm-evaluation-harness: :class:`HarnessLM`, an ``lm_eval.api.model.LM``.

Any model :func:`lightning_llm.loading.load_pretrained` reads (a Hugging Face directory, a ``.ckpt`` of any of our
LightningModules, a sharded checkpoint folder) or a module in memory runs the harness's tasks::

    import lm_eval
    from lightning_llm.evaluation import HarnessLM

    lm = HarnessLM("logs/checkpoints/last.ckpt", batch_size=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai", "arc_easy"])

or, after ``import lightning_llm.evaluation.harness``, ``simple_evaluate(model="lightning_llm",
model_args="pretrained=PATH")`` (the class is registered under ``lightning_llm``).

What is computed is the harness's own definition (the same requests give the same numbers as its ``HFLM``, tested):

* ``loglikelihood``: ``TemplateLM`` tokenizes (trailing context spaces move to the continuation; an empty context is
  the prefix token); the input is ``(context + continuation)[-(max_length + 1):][:-1]`` and the last
  ``len(continuation)`` positions are scored; ``is_greedy`` = argmax equals the continuation at every position.
* ``loglikelihood_rolling``: the harness's disjoint rolling windows (``get_rolling_token_windows`` with
  ``context_len=1``) after the prefix token, summed.
* ``generate_until``: the context is left-truncated to ``max_length - max_gen_toks`` tokens, decoded greedily (or
  sampled with ``do_sample``), cut at the first stop sequence (the ``until`` list plus the EOS text).

How it is computed is ours: requests sorted by length (longest first) into right-padded batches, identical inputs
scored once, the final hidden states projected to the vocabulary ONLY at the scored positions (our Transformer's
``return_hidden``; a full ``(B, T, V)`` log-softmax is what the harness's ``HFLM`` computes) and a cache-sized chunk
of rows at a time (no ``(K, V)`` logits tensor), log-probabilities from the one chunked kernel
:func:`lightning_llm.ops.token_logprobs`; generation uses our KV cache on left-padded
batches, positions from the attention mask, and stops a batch as soon as every row has met a stop sequence.

One process: the harness's data-parallel sharding (``rank`` / ``world_size``) is not implemented; run one evaluation
per device, or ``accelerate launch`` with ``HFLM``, for multi-GPU sharding.

Notation: B batch, T tokens, C width, V vocabulary, K scored positions in a batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_llm.evaluation.lm import LanguageModel, resolve_model
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


def _is_ours(module: nn.Module) -> bool:
    from lightning_llm.nn.transformer import Transformer

    return isinstance(module, Transformer)


@register_model("lightning_llm", "lightning-llm")
class HarnessLM(TemplateLM):
    """An lm-evaluation-harness model backed by our loader, batching, KV cache and chunked log-probabilities.

    Args:
        pretrained: a path :func:`~lightning_llm.loading.load_pretrained` reads, a module in memory (our
            ``Transformer``, a LightningModule holding one, a Hugging Face causal LM, any ``ids -> logits`` module)
            or a :class:`~lightning_llm.evaluation.LanguageModel`.
        tokenizer: a :class:`~lightning_llm.data.Tokenizer`, or a tokenizer directory; default: the model's own.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available.
        dtype: parameter dtype (``"bfloat16"``...); default: as stored.
        batch_size: rows per forward pass (the harness's ``"auto"`` is read as 16).
        max_length: longest model input in tokens; default: the model's position limit, else 2048 (the harness's).
        max_gen_toks: default number of new tokens for ``generate_until`` when a task sets none (harness: 256).
        add_bos_token: force the tokenizer's special tokens on (True) or off (False); default: the tokenizer's
            own template, as the harness does.
        seed: seeds sampling in ``generate_until`` tasks with ``do_sample: true``.
        **kwargs: the harness's extra model arguments (``max_batch_size``...), accepted and ignored.
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
        self.lm, tok = resolve_model(pretrained, tokenizer, device, dtype)
        if tok is None:
            raise ValueError(
                "`tokenizer` is required: the model carries none. Pass the tokenizer it was trained with (a "
                "directory saved by Tokenizer.save, a Hugging Face tokenizer directory, or a Tokenizer object)."
            )
        self.tokenizer = tok
        self.module = self.lm.module
        self.ours = _is_ours(self.module)
        self._max_length = int(max_length) if max_length is not None else (self.lm.max_length or DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = batch_size
        self.add_bos_token = add_bos_token
        self.seed = seed
        self.pad_id = int(getattr(tok, "pad_id", None) or tok.eos_id)
        self.forward_seconds = 0.0

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

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise ValueError(
            "HarnessLM has no chat template: the tokenizers lightning_llm trains carry none. Run the task without "
            "`apply_chat_template` (the default), or format the conversation in the task's doc_to_text."
        )

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

    # ------------------------------------------------------------------ scoring
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """``(input_ids, n_scored)`` rows -> (summed log-prob, all greedy) of the last ``n_scored`` next tokens, where
        the targets are the input shifted by one plus the row's final target (stored as ``input + [last]``)."""
        b = len(rows)
        width = max(len(ids) - 1 for ids, _ in rows)
        inp = torch.full((b, width), self.pad_id, dtype=torch.long)  # (B, T) right-padded
        r_idx, c_idx, tgt = [], [], []
        for i, (ids, n) in enumerate(rows):
            t = len(ids) - 1
            inp[i, :t] = torch.as_tensor(ids[:-1], dtype=torch.long)
            r_idx.extend([i] * n)
            c_idx.extend(range(t - n, t))
            tgt.extend(ids[t - n + 1 :])
        rows_t = torch.as_tensor(r_idx, dtype=torch.long)  # (K,)
        cols_t = torch.as_tensor(c_idx, dtype=torch.long)  # (K,)
        targets = torch.as_tensor(tgt, dtype=torch.long)  # (K,)
        with torch.no_grad():
            if self.ours:
                dev = self.device
                hidden = self.module(inp.to(dev), return_hidden=True)  # (B, T, C)
                sel = hidden[rows_t.to(dev), cols_t.to(dev)]  # (K, C): only the scored positions
                targets = targets.to(dev)
                logp = torch.empty(len(tgt), dtype=torch.float32, device=dev)  # (K,)
                miss = torch.empty(len(tgt), dtype=torch.float32, device=dev)  # (K,)
                step = chunk_rows(self.module.config.vocab_size, dev)  # a (k, V) logits chunk stays cache-sized
                for s in range(0, len(tgt), step):
                    z = self.module.logits(sel[s : s + step])  # (k, V)
                    logp[s : s + step] = token_logprobs(z, targets[s : s + step])
                    miss[s : s + step] = (z.argmax(dim=-1) != targets[s : s + step]).float()
            else:
                logits = self.lm.logits(inp)[rows_t, cols_t]  # (K, V)
                logp = token_logprobs(logits, targets)  # (K,) float32
                miss = (logits.argmax(dim=-1) != targets).to(torch.float32)  # (K,)
        sums = torch.zeros(b, dtype=logp.dtype).index_add_(0, rows_t, logp.cpu())  # (B,)
        misses = torch.zeros(b).index_add_(0, rows_t, miss.cpu())  # (B,)
        return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Score ``(cache_key, context_ids, continuation_ids)`` requests (the harness's token-level entry point)."""
        keyed: dict[tuple[int, ...], list[int]] = {}
        for i, (_key, ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                raise ValueError(
                    f"request {i} ({str(_key)[:80]!r}) has an empty continuation after tokenization; every "
                    "continuation needs at least one token."
                )
            full = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            if len(full) < 2:
                raise ValueError(f"request {i}: nothing to condition on (context and continuation are one token).")
            n = min(len(cont), len(full) - 1)
            keyed.setdefault((*full, -n), []).append(i)  # identical inputs are scored once
        unique = sorted(keyed, key=lambda k: -len(k))  # longest first: each batch's first row sets its width
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(unique), self.batch_size):
            batch = unique[start : start + self.batch_size]
            scores = self._score([(list(k[:-1]), -k[-1]) for k in batch])
            for key, score in zip(batch, scores):
                for i in keyed[key]:
                    out[i] = score
                    if requests[i][0] is not None:  # rolling windows carry no cache key
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over the harness's disjoint rolling windows."""
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
            for r, (logp, _greedy) in zip(owner, self._loglikelihood_tokens(windows)):
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
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
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
            top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
            enc = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] for i in members}
            order = sorted(members, key=lambda i: -len(enc[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                texts = self._generate([enc[i] or [self.prefix_token_id] for i in batch], max_new, until, temperature,
                                       top_k, top_p, generator)  # fmt: skip
                for i, text in zip(batch, texts):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(
        self,
        prompts: list[list[int]],
        max_new: int,
        until: list[str],
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator,
    ) -> list[str]:
        """KV-cache decoding of left-padded prompts; stops when every row has emitted EOS or met a stop sequence."""
        from lightning_llm.nn.generation import left_pad, sample_next

        model = self.module
        ids, mask = left_pad(prompts, self.pad_id, self.device)  # (B, P), (B, P)
        b, p = ids.shape
        cache = model.new_kv_cache(b, p + max_new)
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        new: list[list[int]] = [[] for _ in range(b)]
        step, seq_mask = ids, mask
        stops = [s for s in until if s]
        for _ in range(max_new):
            hidden = model(step, attention_mask=seq_mask, kv_cache=cache, return_hidden=True)[:, -1]  # (B, C)
            token, _ = sample_next(model.logits(hidden).float(), temperature, top_k, top_p, generator)  # (B,)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            for r, t in enumerate(token.tolist()):
                if done[r]:
                    continue
                new[r].append(t)
                if t == self.eot_token_id or (stops and any(s in self.tok_decode(new[r][-16:]) for s in stops)):
                    done[r] = True
            if bool(done.all()):
                break
            seq_mask = torch.cat((seq_mask, torch.ones_like(token)[:, None]), dim=1)  # (B, S + 1)
            step = token[:, None]  # (B, 1)
        return [self.tok_decode(row) for row in new]
