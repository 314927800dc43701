"""``LambadaDataModule``: LAMBADA (OpenAI version) split and encoded exactly as lm-evaluation-harness's
``lambada_openai`` task does, batched for one forward pass per batch.

Per passage ``text`` (harness task yaml and ``TemplateLM._encode_pair`` / ``loglikelihood``):

    context      = " ".join(text.split(" ")[:-1])
    target       = " " + text.split(" ")[-1]
    trailing spaces of context are moved onto the front of the continuation;
    whole        = tok(context + continuation)
    context_ids  = tok(context)
    target_ids   = whole[len(context_ids):]
    empty context: context_ids = [prefix id] (bos if the tokenizer has one, else eos),
                   target_ids = tok(target) without special tokens; if its first id is the prefix id itself,
                   that id is the context instead (harness ``TemplateLM.loglikelihood``)
    input_ids    = (context_ids + target_ids)[-(max_length + 1):][:-1]

``tok`` is HFLM's ``tok_encode`` with its default ``add_bos_token=None``: the tokenizer's own special tokens
(its post-processor template: nothing for GPT-2 / Pythia, a leading bos for Llama-style tokenizers), except for a
string that already starts with the prefix token's text; ``add_special_tokens=False`` gives HFLM's
``add_bos_token=False`` (older lm-evaluation-harness releases encoded causal LMs that way).

The last ``len(target_ids)`` positions of ``input_ids`` predict the target tokens (harness
``_select_cont_toks``). Examples are sorted like the harness's ``Collator`` (longest first, ties by the
token tuple) and right-padded: with a causal model, padding after the real tokens changes none of
their log-probabilities.

Notation:
    B    examples in a batch.
    T    the longest ``input_ids`` in the batch (padded length).
    K    number of target tokens of an example (``len(target_ids)``).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_llm.data.text import _check_int, _json_lines
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.ops import IGNORE_INDEX

__all__ = [
    "LambadaDataModule",
    "collate_lambada",
    "encode_lambada",
    "harness_order",
    "lambada_split",
    "read_lambada_jsonl",
]

DEFAULT_LAMBADA = "EleutherAI/lambada_openai"


def lambada_split(text: str) -> tuple[str, str]:
    """Splits a passage into (context, target) exactly as ``lambada_openai``'s ``doc_to_text`` /
    ``doc_to_target`` do: the last space-separated word (with its leading space) is the target.

    Example:
        >>> lambada_split("He ate the whole cake")
        ('He ate the whole', ' cake')
    """
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def move_trailing_spaces(context: str, continuation: str) -> tuple[str, str]:
    """Harness ``_encode_pair``: trailing spaces of the context move to the front of the continuation.

    Example:
        >>> move_trailing_spaces("the cat ", "sat")
        ('the cat', ' sat')
    """
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def read_lambada_jsonl(path: str | os.PathLike) -> list[str]:
    """Reads a ``.jsonl`` file of ``{"text": ...}`` objects (the format of OpenAI's ``lambada_test.jsonl``).

    Args:
        path: The file.

    Returns:
        The passages, in file order (blank lines skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`={str(path)!r} does not exist. Pass a .jsonl file or a dataset name.")
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, record in _json_lines(f):
            if isinstance(record, json.JSONDecodeError):
                raise ValueError(
                    f"{path}:{lineno} is not valid JSON ({record}); expected one {{'text': ...}} per line."
                ) from record
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno} has no string field 'text'; expected one {{'text': ...}} per line.")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"`path`={str(path)!r} holds no passages.")
    return texts


def _harness_encode(
    tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool, prefix_token_id: int
) -> list[list[int]]:
    """HFLM ``tok_encode`` of many strings: with the tokenizer's own special tokens (its post-processor template)
    when ``add_special_tokens``, except for strings that start with the prefix token's text; else without."""
    backend = getattr(tokenizer, "backend", None)
    if not add_special_tokens or backend is None or not texts:
        return tokenizer.encode_batch(texts)
    prefix_text = tokenizer.decode([prefix_token_id], skip_special_tokens=False)  # harness has_bos_prefix
    plain = [i for i, text in enumerate(texts) if text.startswith(prefix_text)]
    special = [i for i, text in enumerate(texts) if not text.startswith(prefix_text)]
    out: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(plain, tokenizer.encode_batch([texts[i] for i in plain])):
        out[i] = ids
    for i, enc in zip(special, backend.encode_batch([texts[i] for i in special], add_special_tokens=True)):
        out[i] = list(enc.ids)
    return out


def encode_lambada(
    texts: list[str],
    tokenizer: Tokenizer,
    max_length: int = 2048,
    prefix_token_id: int | None = None,
    add_special_tokens: bool = True,
) -> list[dict[str, Any]]:
    """Splits and encodes passages the harness way (see the module docstring).

    Args:
        texts: Passages.
        tokenizer: The model's tokenizer.
        max_length: The model's context length; longer inputs keep their last ``max_length`` tokens.
        prefix_token_id: Context for an empty context; default bos if the tokenizer has one, else eos.
        add_special_tokens: Encode with the tokenizer's own special tokens, as HFLM does by default
            (``add_bos_token=None``); ``False`` as HFLM with ``add_bos_token=False``. Tokenizers whose template adds
            nothing (GPT-2, Pythia, :meth:`Tokenizer.train_bpe`) give the same ids either way.

    Returns:
        One dict per passage: ``index``, ``text``, ``context``, ``target`` (``" " + last word``), ``continuation``
        (the target with any trailing context spaces moved onto it), ``context_ids``, ``target_ids``,
        ``input_ids`` (the truncated model input) and ``target_start`` (index in ``input_ids`` of the
        position that predicts ``target_ids[0]``).
    """
    if prefix_token_id is None:
        prefix_token_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    pairs = []  # (context, continuation, target) after the harness's trailing-space move
    for text in texts:
        context, target = lambada_split(text)
        pairs.append((*move_trailing_spaces(context, target), target))
    # Harness loglikelihood(): an empty context (before the space move) uses [prefix_token_id] as context;
    # any other context goes through _encode_pair: whole = tok(context + continuation), ctx = tok(context).
    regular = [i for i, text in enumerate(texts) if lambada_split(text)[0] != ""]
    whole = _harness_encode(
        tokenizer, [pairs[i][0] + pairs[i][1] for i in regular], add_special_tokens, prefix_token_id
    )
    ctx = _harness_encode(tokenizer, [pairs[i][0] for i in regular], add_special_tokens, prefix_token_id)
    encoded: dict[int, tuple[list[int], list[int]]] = {i: (c, w[len(c) :]) for i, c, w in zip(regular, ctx, whole)}
    examples = []
    for index, (text, (context, continuation, target)) in enumerate(zip(texts, pairs)):
        if index in encoded:
            context_ids, target_ids = encoded[index]
        else:
            target_ids = tokenizer.encode(continuation)  # harness: add_special_tokens=False here
            if target_ids and target_ids[0] == prefix_token_id:
                context_ids, target_ids = target_ids[:1], target_ids[1:]
            else:
                context_ids = [prefix_token_id]
        if not target_ids:
            raise ValueError(f"LAMBADA passage {index} has an empty target after tokenization: {text[-80:]!r}")
        if len(target_ids) > max_length:
            raise ValueError(
                f"LAMBADA passage {index} has {len(target_ids)} target tokens, more than `max_length`={max_length}. "
                "Raise `max_length`."
            )
        input_ids = (context_ids + target_ids)[-(max_length + 1) :][:-1]
        if len(input_ids) < len(target_ids):
            raise ValueError(
                f"LAMBADA passage {index} leaves no context token before its target (context {context!r}); "
                "the harness cannot score it either. Remove the passage."
            )
        examples.append(
            {
                "index": index,
                "text": text,
                "context": context,
                "target": target,
                "continuation": continuation,
                "context_ids": context_ids,
                "target_ids": target_ids,
                "input_ids": input_ids,
                "target_start": len(input_ids) - len(target_ids),
            }
        )
    return examples


def harness_order(examples: list[dict[str, Any]]) -> list[int]:
    """Indices of ``examples`` in lm-evaluation-harness's evaluation order: by descending length of
    ``context_ids + target_ids``, ties broken by the token tuple (its ``Collator`` sort key)."""
    return sorted(
        range(len(examples)),
        key=lambda i: (
            -(len(examples[i]["context_ids"]) + len(examples[i]["target_ids"])),
            tuple(examples[i]["context_ids"] + examples[i]["target_ids"]),
        ),
    )


def collate_lambada(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads encoded examples into a batch.

    Args:
        examples: Dicts from :func:`encode_lambada`.
        pad_id: Input id in padding (any valid id; the attention mask hides it).

    Returns:
        ``input_ids`` (B, T) long; ``targets`` (B, T) long, ``-100`` except ``targets[b, t]`` = the target
        token that position t predicts; ``attention_mask`` (B, T) long, 1 on real tokens; ``index`` (B,) the
        example's position in the dataset file.
    """
    t_max = max(len(ex["input_ids"]) for ex in examples)
    b = len(examples)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    targets = torch.full((b, t_max), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t_max), dtype=torch.long)
    for row, ex in enumerate(examples):
        n, start, k = len(ex["input_ids"]), ex["target_start"], len(ex["target_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        targets[row, start : start + k] = torch.tensor(ex["target_ids"], dtype=torch.long)
    index = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask, "index": index}


class LambadaDataModule(L.LightningDataModule):
    """LAMBADA (``lambada_openai``) as lm-evaluation-harness evaluates it, for ``Trainer.test``.

    Args:
        path: A Hugging Face dataset name (default ``"EleutherAI/lambada_openai"``, loaded with
            ``datasets.load_dataset(path, dataset_config, split=split)``), a local ``.jsonl`` of ``{"text": ...}``
            lines, or a local dataset directory.
        tokenizer: The model's tokenizer: a :class:`Tokenizer`, or a path / hub name for
            :meth:`Tokenizer.from_pretrained`. May be set later (``dm.tokenizer = ...``) before ``setup``.
        batch_size: B.
        max_examples: Use only the first this-many passages (file order).
        max_length: The model's context length (harness ``max_length``).
        dataset_config: Dataset configuration for hub datasets (the harness uses ``"default"``).
        split: Dataset split for hub datasets (the harness uses ``"test"``).
        num_workers: DataLoader workers.
        add_special_tokens: Encode with the tokenizer's own special tokens (e.g. Llama's bos), as the harness's
            HFLM does by default; ``False`` matches HFLM ``add_bos_token=False`` (see :func:`encode_lambada`).

    Attributes:
        examples: The encoded passages in file order (see :func:`encode_lambada`), after ``setup``.
    """

    def __init__(
        self,
        path: str = DEFAULT_LAMBADA,
        tokenizer: str | Tokenizer | None = None,
        batch_size: int = 16,
        max_examples: int | None = None,
        max_length: int = 2048,
        dataset_config: str | None = "default",
        split: str = "test",
        num_workers: int = 0,
        add_special_tokens: bool = True,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("max_length", max_length, 1)
        _check_int("num_workers", num_workers, 0)
        if max_examples is not None:
            _check_int("max_examples", max_examples, 1, hint=" (or None)")
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"`add_special_tokens` must be a bool, got {add_special_tokens!r}.")
        if not isinstance(path, str) or not path:
            raise TypeError(f"`path` must be a non-empty string, got {path!r}.")
        self.save_hyperparameters(ignore=["tokenizer"] if isinstance(tokenizer, Tokenizer) else None)
        self.path, self.dataset_config, self.split = path, dataset_config, split
        self.batch_size, self.num_workers, self.add_special_tokens = batch_size, num_workers, add_special_tokens
        self.max_examples, self.max_length = max_examples, max_length
        self._tokenizer_spec = tokenizer
        self._tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self._examples: list[dict[str, Any]] | None = None
        self._order: list[int] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded on first access when given as a path or name)."""
        if self._tokenizer is None:
            if self._tokenizer_spec is None:
                raise ValueError(
                    "LambadaDataModule has no tokenizer: pass `tokenizer=` (the model's tokenizer directory or hub "
                    "name, or a Tokenizer) or set `datamodule.tokenizer = ...` before testing."
                )
            self._tokenizer = Tokenizer.from_pretrained(self._tokenizer_spec)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: str | Tokenizer) -> None:
        if not isinstance(value, (str, os.PathLike, Tokenizer)):
            raise TypeError(f"`tokenizer` must be a Tokenizer or a path/hub name, got {type(value).__name__}.")
        self._tokenizer_spec = value
        self._tokenizer = value if isinstance(value, Tokenizer) else None
        self._examples = self._order = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the CLI links it to the model's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    def load_texts(self) -> list[str]:
        """The passages, from the local file/directory or the hub (first ``max_examples`` of them)."""
        local = Path(self.path).expanduser()
        if local.is_file():
            texts = read_lambada_jsonl(local)
        else:
            if self.path.endswith((".jsonl", ".json")) or self.path.startswith(("/", "./", "../", "~")):
                raise FileNotFoundError(
                    f"`path`={self.path!r} does not exist. Pass a .jsonl of {{'text': ...}} lines or a dataset name."
                )
            import datasets

            try:
                if local.is_dir():
                    ds = datasets.load_dataset(str(local), split=self.split)
                else:
                    ds = datasets.load_dataset(self.path, self.dataset_config, split=self.split)
            except Exception as err:  # noqa: BLE001 - re-raised with the argument and the fix
                raise ValueError(
                    f"`path`={self.path!r} (config {self.dataset_config!r}, split {self.split!r}) could not be loaded with "
                    f"`datasets.load_dataset`: {type(err).__name__}: {err}. Offline, pass a local .jsonl file."
                ) from err
            if "text" not in ds.column_names:
                raise ValueError(f"`path`={self.path!r} has no 'text' column (columns: {ds.column_names}).")
            texts = list(ds["text"])
        if self.max_examples is not None:
            texts = texts[: self.max_examples]
        if not texts:
            raise ValueError(f"`path`={self.path!r} holds no passages.")
        return texts

    @property
    def examples(self) -> list[dict[str, Any]]:
        """Encoded passages in file order (``index``, ``context``, ``target``, ``context_ids``, ``target_ids``,
        ``input_ids``, ``target_start``); built on first access."""
        if self._examples is None:
            self._examples = encode_lambada(
                self.load_texts(), self.tokenizer, self.max_length, add_special_tokens=self.add_special_tokens
            )
            self._order = harness_order(self._examples)
        return self._examples

    def setup(self, stage: str | None = None) -> None:
        """Loads, splits and encodes the passages."""
        _ = self.examples

    def test_dataloader(self) -> DataLoader:
        """Length-sorted (longest first, as the harness), right-padded batches; see :func:`collate_lambada`."""
        examples = self.examples
        assert self._order is not None
        return DataLoader(
            [examples[i] for i in self._order],  # a list is a map-style dataset
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=partial(collate_lambada, pad_id=self.tokenizer.pad_id),  # picklable for workers
        )
