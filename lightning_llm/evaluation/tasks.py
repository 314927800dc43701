"""Evaluation tasks: sliding-window perplexity and bits per byte, LAMBADA, multiple choice with HELM calibration.

Definitions follow lm-evaluation-harness:

* **Continuation scoring** (``_encode_pair``): ``whole = tok(context + continuation)``, ``ctx = tok(context)``,
  continuation tokens ``whole[len(ctx):]``; an empty context becomes ``[bos or eos]``; the model input is
  ``(ctx + cont)[-(max_length + 1):][:-1]`` and the last ``len(cont)`` positions predict the continuation. The
  score is the summed log-probability; ``greedy`` is True when the argmax equals the continuation at every token.
* **Rolling perplexity**: the text is encoded once, prefixed with ``bos`` (``eos`` when there is none) so that every
  text token is scored; windows of ``max_length`` inputs start every ``stride`` tokens and score only the targets no
  earlier window scored (the Hugging Face "perplexity of fixed-length models" recipe; ``stride == max_length`` is
  non-overlapping chunks). ``bits_per_byte = NLL / (ln 2 * UTF-8 bytes of the text)``.
* **LAMBADA** (``lambada_openai``): split and encoded by :func:`lightning_llm.data.lambada.encode_lambada`, scored by
  the LAMBADA metric's ``lambada_update`` / ``lambada_compute``: ``acc`` = all target tokens greedy,
  ``ppl = exp(-mean summed target log-probability)``.
* **Multiple choice** scored per choice (``context = question``, ``continuation = " " + choice``): ``acc`` picks the
  highest summed log-probability, ``acc_norm`` the highest per UTF-8 byte (harness ``acc_norm``); the HELM
  confidence is the max softmax over the choices' (length-normalised) log-probabilities, and its calibration is
  :func:`~lightning_llm.metrics.functional.calibration.helm_calibration`.

Notation: N tokens in a text, L window length (``max_length``), S stride, B batch, T padded length, V vocabulary,
C choices.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_llm.ops import IGNORE_INDEX, token_logprobs

__all__ = [
    "ContinuationScore",
    "MultipleChoiceExample",
    "embedded_cloze_texts",
    "embedded_multiple_choice",
    "embedded_texts",
    "encode_pair",
    "evaluate_lambada",
    "evaluate_multiple_choice",
    "load_multiple_choice",
    "perplexity_vs_context",
    "rolling_nll",
    "score_continuations",
    "score_lambada",
    "text_perplexity",
]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _logits_fn(lm: Any) -> LogitsFn:
    """``LanguageModel.logits`` or any callable ``(B, T) ids -> (B, T, V)``."""
    fn = getattr(lm, "logits", lm)
    if not callable(fn):
        raise TypeError(f"`lm` must be a LanguageModel or a callable ids -> logits, got {type(lm).__name__}.")
    return fn


def _prefix_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_id", None)
    return bos if bos is not None else tokenizer.eos_id


def _encode_text(tokenizer: Any, texts: Sequence[str], max_chars: int | None) -> tuple[str, list[int]]:
    """``"\n\n".join(texts)`` (first ``max_chars`` characters) and its ids after the bos (or eos) prefix."""
    text = "\n\n".join(texts)[:max_chars]
    if not text:
        raise ValueError("`texts` is empty: nothing to score. Pass at least one non-empty document.")
    return text, [_prefix_id(tokenizer), *tokenizer.encode(text)]


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class ContinuationScore:
    """Summed log-probability of a continuation, whether greedy decoding reproduces it, and its token count."""

    logprob: float
    greedy: bool
    n_tokens: int


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Harness ``_encode_pair``: trailing context spaces move to the continuation; an empty context is ``[bos/eos]``.

    Example:
        >>> from lightning_llm.data.tokenizer import Tokenizer
        >>> tok = Tokenizer.train_bpe(["the cat sat on the mat"] * 10, vocab_size=270)
        >>> ctx, cont = encode_pair(tok, "the cat ", "sat")  # becomes ("the cat", " sat")
        >>> tok.decode(cont)
        ' sat'
    """
    from lightning_llm.data.lambada import move_trailing_spaces

    context, continuation = move_trailing_spaces(context, continuation)
    if not context:
        return [_prefix_id(tokenizer)], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]


def score_continuations(
    lm: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[ContinuationScore]:
    """Score ``(context_ids, continuation_ids)`` pairs in right-padded, length-sorted batches.

    Args:
        lm: a :class:`~lightning_llm.evaluation.lm.LanguageModel` or a callable ``(B, T) ids -> (B, T, V) logits``.
        requests: token-id pairs (see :func:`encode_pair`); every continuation needs >= 1 token.
        max_length: longest model input; longer inputs keep their last ``max_length`` tokens (harness).
        batch_size: B.
        pad_id: id written after short rows (never attended to by a real token of a causal model).

    Returns:
        One :class:`ContinuationScore` per request, in request order.
    """
    logits_fn = _logits_fn(lm)
    if max_length is None:
        max_length = getattr(lm, "max_length", None)
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if len(cont) == 0:
            raise ValueError(f"requests[{i}] has an empty continuation; every continuation needs at least one token.")
        full = list(ctx) + list(cont)
        inp = full[-(max_length + 1) :][:-1] if max_length else full[:-1]
        if len(inp) < len(cont) or not inp:
            raise ValueError(
                f"requests[{i}]: max_length={max_length} leaves no context before its {len(cont)} continuation tokens."
            )
        rows.append({"index": i, "input_ids": inp, "target_ids": list(cont), "target_start": len(inp) - len(cont)})
    from lightning_llm.data.lambada import collate_lambada
    from lightning_llm.metrics.functional.lambada import lambada_update

    order = sorted(rows, key=lambda r: -len(r["input_ids"]))
    out: list[ContinuationScore | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = collate_lambada(order[start : start + batch_size], pad_id)  # right-padded, IGNORE_INDEX off target
        logits = logits_fn(batch["input_ids"])  # (B, T, V)
        greedy, logprob = lambada_update(logits, batch["targets"].to(logits.device), IGNORE_INDEX)  # (B,), (B,)
        for b, i in enumerate(batch["index"].tolist()):
            out[i] = ContinuationScore(float(logprob[b]), bool(greedy[b]), len(rows[i]["target_ids"]))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- perplexity
def rolling_nll(
    lm: Any, ids: Sequence[int] | torch.Tensor, max_length: int, stride: int | None = None, batch_size: int = 8
) -> tuple[float, int]:
    """Summed NLL (nats) and count of tokens ``ids[1:]``, each predicted from a window of at most ``max_length``.

    Window ``s`` (``s = 0, S, 2S, ...``) feeds ``ids[s : s + L]`` and scores the targets ``ids[s+1 : s+L+1]`` that no
    earlier window scored; with ``stride=1`` token ``j`` sees ``ids[max(0, j - L) : j]``; with ``stride=L`` the windows
    do not overlap.
    """
    stride = max_length if stride is None else stride
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"`max_length` must be an int >= 1, got {max_length!r}.")
    if not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"`stride` must be an int in [1, max_length={max_length}], got {stride!r}.")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # (N,)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"rolling perplexity needs at least 2 tokens, got {n}; give a longer text.")
    windows = []  # (start, length, first scored offset)
    done = 0  # targets ids[1 .. done] are scored
    s = 0
    while done < n - 1:
        length = min(max_length, n - 1 - s)
        first = done - s  # offset inside the window of the first new target
        windows.append((s, length, first))
        done = s + length
        s += stride
    logits_fn = _logits_fn(lm)
    nll, count = 0.0, 0
    for length in sorted({w[1] for w in windows}, reverse=True):
        same = [w for w in windows if w[1] == length]
        for start in range(0, len(same), batch_size):
            chunk = same[start : start + batch_size]
            inp = torch.stack([ids[w[0] : w[0] + length] for w in chunk])  # (B, L)
            tgt = torch.stack([ids[w[0] + 1 : w[0] + length + 1] for w in chunk])  # (B, L)
            logits = logits_fn(inp)  # (B, L, V)
            logp = token_logprobs(logits, tgt.to(logits.device))  # (B, L)
            for b, w in enumerate(chunk):
                nll -= float(logp[b, w[2] :].double().sum())
                count += length - w[2]
    return nll, count


def text_perplexity(
    lm: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_chars: int | None = None,
) -> dict[str, float]:
    """Zero-shot perplexity and bits per byte of ``"\\n\\n".join(texts)`` (rolling windows, see :func:`rolling_nll`).

    Returns:
        ``{"ppl", "bits_per_byte", "nll", "tokens", "bytes", "max_length", "stride"}``.
    """
    text, ids = _encode_text(tokenizer, texts, max_chars)
    nll, count = rolling_nll(lm, ids, max_length, stride, batch_size)
    n_bytes = len(text.encode("utf-8"))
    return {
        "ppl": math.exp(nll / count),
        "bits_per_byte": nll / (math.log(2.0) * n_bytes),
        "nll": nll,
        "tokens": count,
        "bytes": n_bytes,
        "max_length": max_length,
        "stride": stride or max_length,
    }


def perplexity_vs_context(
    lm: Any,
    tokenizer: Any,
    texts: Sequence[str],
    lengths: Sequence[int],
    batch_size: int = 8,
    max_chars: int | None = None,
) -> dict[int, float]:
    """Perplexity in non-overlapping windows of each length (the ALiBi paper's evaluation): ``{L: ppl}``."""
    _, ids = _encode_text(tokenizer, texts, max_chars)
    out = {}
    for length in lengths:
        nll, count = rolling_nll(lm, ids, int(length), int(length), batch_size)
        out[int(length)] = math.exp(nll / count)
    return out


def embedded_texts(split: str = "test") -> list[str]:
    """Documents of a split of the embedded corpus (Python's documentation; no network)."""
    from lightning_llm.data.corpus import embedded_split_documents

    return embedded_split_documents()[split]


def _held_out(split: str) -> list[str]:
    """``"heldout"``: validation + test documents (never trained on); otherwise the named split."""
    if split == "heldout":
        return embedded_texts("val") + embedded_texts("test")
    return embedded_texts(split)


# ---------------------------------------------------------------------------------------------------- LAMBADA
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MARKUP = re.compile(r"[|=+{}\[\]<>*_#\\`]")


def _prose(words: list[str]) -> bool:
    """A sentence of ordinary words: no table or code markup, at least 80% alphabetic words."""
    if any(_MARKUP.search(w) for w in words):
        return False
    return sum(w.strip(",.;:()\"'").isalpha() for w in words) >= 0.8 * len(words)


def embedded_cloze_texts(n: int = 200, split: str = "heldout", min_words: int = 12) -> list[str]:
    """LAMBADA-style passages from the embedded corpus: sentences whose last word is alphabetic, the final period
    dropped (the target is the last word). Deterministic: documents and sentences in corpus order."""
    out = []
    for doc in _held_out(split):
        for sentence in _SENTENCE.split(" ".join(doc.split())):
            words = sentence.rstrip(".").split(" ")
            ok = len(words) >= min_words and sentence.endswith(".") and words[-1].isalpha() and len(words[-1]) >= 3
            if ok and _prose(words):
                out.append(" ".join(words))
                if len(out) == n:
                    return out
    return out


def evaluate_lambada(
    lm: Any, tokenizer: Any, texts: Sequence[str], max_length: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """LAMBADA ``acc`` and ``ppl`` (harness ``lambada_openai`` definitions) of passages ``texts``."""
    from lightning_llm.data.lambada import encode_lambada

    max_length = max_length or getattr(lm, "max_length", None) or 2048
    examples = encode_lambada(list(texts), tokenizer, max_length)
    return {**score_lambada(lm, examples, max_length, batch_size, tokenizer.pad_id), "n": len(examples)}


def score_lambada(
    lm: Any, examples: Sequence[dict[str, Any]], max_length: int | None = None, batch_size: int = 16, pad_id: int = 0
) -> dict[str, float]:
    """``{"acc", "ppl"}`` of passages encoded by :func:`~lightning_llm.data.lambada.encode_lambada`: each is scored by
    :func:`score_continuations` (the LAMBADA metric's own ``lambada_update``), the results reduced by its
    ``lambada_compute``."""
    from lightning_llm.metrics.functional.lambada import lambada_compute

    pairs = [(ex["context_ids"], ex["target_ids"]) for ex in examples]
    scores = score_continuations(lm, pairs, max_length, batch_size, pad_id)
    correct = torch.tensor(sum(s.greedy for s in scores))
    logprob_sum = torch.tensor(sum(s.logprob for s in scores), dtype=torch.float64)
    return {k: float(v) for k, v in lambada_compute(correct, logprob_sum, torch.tensor(len(scores))).items()}


# ---------------------------------------------------------------------------------------------------- multiple choice
@dataclass
class MultipleChoiceExample:
    """One multiple-choice item: ``answer`` is the index of the correct entry of ``choices``."""

    question: str
    choices: list[str]
    answer: int

    def __post_init__(self) -> None:
        if not isinstance(self.question, str):
            raise TypeError(f"`question` must be a str, got {type(self.question).__name__}.")
        if not isinstance(self.choices, (list, tuple)) or len(self.choices) < 2:
            raise ValueError(f"`choices` must be a list of at least 2 strings, got {self.choices!r}.")
        self.choices = [str(c) for c in self.choices]
        if (
            isinstance(self.answer, bool)
            or not isinstance(self.answer, int)
            or not 0 <= self.answer < len(self.choices)
        ):
            raise ValueError(
                f"`answer` must be an int index into the {len(self.choices)} choices, got {self.answer!r}; the .jsonl "
                "schema is {question: str, choices: [str, ...], answer: int}."
            )


def load_multiple_choice(
    path: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    question_field: str = "question",
    choices_field: str = "choices",
    answer_field: str = "answer",
    dataset_config: str | None = None,
) -> list[MultipleChoiceExample]:
    """Multiple-choice items from a local ``.jsonl`` (``{"question", "choices", "answer"}`` per line) or a Hugging Face
    dataset (``datasets.load_dataset(path, dataset_config, split=split)``; needs network unless cached).

    A letter answer (``"B"``) is turned into its index; ``choices`` may be a list or a dict with a ``text`` list
    (ARC's layout).
    """
    local = Path(path).expanduser()
    if local.is_file():
        records = []
        with local.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{local}:{lineno} is not valid JSON ({err}).") from err
    else:
        if str(path).endswith((".jsonl", ".json")):
            raise FileNotFoundError(f"`path`={str(path)!r} does not exist; pass a .jsonl file or a dataset name.")
        import datasets

        records = list(datasets.load_dataset(str(path), dataset_config, split=split))
    out = []
    for i, rec in enumerate(records[:limit] if limit else records):
        if not isinstance(rec, dict) or any(k not in rec for k in (question_field, choices_field, answer_field)):
            raise ValueError(
                f"record {i} of {path} lacks one of the fields {question_field!r}, {choices_field!r}, {answer_field!r}"
                f" (has {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}); set the *_field arguments."
            )
        choices = rec[choices_field]
        if isinstance(choices, dict):
            choices = choices.get("text", choices)
        answer = rec[answer_field]
        if isinstance(answer, str):
            answer = ord(answer.strip().upper()) - ord("A") if not answer.strip().isdigit() else int(answer)
        out.append(MultipleChoiceExample(str(rec[question_field]), list(choices), int(answer)))
    return out


def embedded_multiple_choice(
    n: int = 100, seed: int = 0, n_choices: int = 4, ending_words: int = 4
) -> list[MultipleChoiceExample]:
    """An embedded "sentence ending" task (HellaSwag-like) built deterministically from the embedded corpus's test
    split: the question is a sentence without its last ``ending_words`` words, the choices are its true ending and
    the endings of ``n_choices - 1`` other sentences; the position of the answer is drawn from ``Random(seed)``.
    Sentences come from the validation and test documents (held out from training)."""
    sentences = []
    for doc in _held_out("heldout"):
        for sentence in _SENTENCE.split(" ".join(doc.split())):
            words = sentence.split(" ")
            if 10 <= len(words) <= 40 and sentence[:1].isupper() and sentence.endswith(".") and _prose(words):
                sentences.append(words)
    if len(sentences) < n_choices:
        raise ValueError("The embedded corpus gave too few sentences for the multiple-choice task.")
    rng = random.Random(seed)
    picked = rng.sample(range(len(sentences)), min(n, len(sentences)))
    out = []
    for idx in picked:
        words = sentences[idx]
        ending = " ".join(words[-ending_words:])
        others: list[str] = []
        while len(others) < n_choices - 1:
            other = " ".join(sentences[rng.randrange(len(sentences))][-ending_words:])
            if other != ending and other not in others:
                others.append(other)
        answer = rng.randrange(n_choices)
        choices = others[:answer] + [ending] + others[answer:]
        out.append(MultipleChoiceExample(" ".join(words[:-ending_words]), choices, answer))
    return out


def evaluate_multiple_choice(
    lm: Any,
    tokenizer: Any,
    examples: Sequence[MultipleChoiceExample],
    length_normalize: bool = True,
    batch_size: int = 16,
    max_length: int | None = None,
    template: str = "{question}",
    num_bins: int = 10,
) -> dict[str, Any]:
    """Score every choice, report ``acc``, ``acc_norm``, HELM calibration and per-instance details.

    Args:
        length_normalize: HELM confidence from per-byte log-probabilities (``acc_norm``'s scores) instead of sums.
        template: how a question becomes the context (``{question}`` is replaced).

    Returns:
        ``{"acc", "acc_norm", "n", "calibration": {...helm keys...}, "confidence": [...], "correct": [...],
        "predicted": [...]}``.
    """
    from lightning_llm.metrics.functional.calibration import helm_calibration
    from lightning_llm.metrics.functional.confidence import multiple_choice_confidence

    if not examples:
        raise ValueError("`examples` is empty: give at least one multiple-choice item.")
    requests, owner = [], []
    for i, ex in enumerate(examples):
        context = template.format(question=ex.question)
        for choice in ex.choices:
            requests.append(encode_pair(tokenizer, context, " " + choice))
            owner.append(i)
    scores = score_continuations(lm, requests, max_length, batch_size, tokenizer.pad_id)
    n_choices = max(len(ex.choices) for ex in examples)
    lp = torch.full((len(examples), n_choices), float("-inf"), dtype=torch.float64)  # (N, C)
    nbytes = torch.ones((len(examples), n_choices), dtype=torch.float64)  # (N, C)
    k = 0
    for i, ex in enumerate(examples):
        for c, choice in enumerate(ex.choices):
            lp[i, c] = scores[k].logprob
            nbytes[i, c] = max(1, len((" " + choice).encode("utf-8")))
            k += 1
    answers = torch.tensor([ex.answer for ex in examples])
    pred = lp.argmax(1)
    pred_norm = (lp / nbytes).argmax(1)
    if length_normalize:
        conf, chosen = multiple_choice_confidence(lp, nbytes, length_normalize=True)
    else:
        conf, chosen = multiple_choice_confidence(lp)
    correct = (chosen == answers).long()
    return {
        "acc": float((pred == answers).double().mean()),
        "acc_norm": float((pred_norm == answers).double().mean()),
        "n": len(examples),
        "calibration": helm_calibration(conf, correct, num_bins=num_bins),
        "confidence": conf.tolist(),
        "correct": correct.tolist(),
        "predicted": chosen.tolist(),
        "examples": [asdict(ex) for ex in examples[:3]],
    }
