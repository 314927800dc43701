"""``SFTDataModule``: supervised fine-tuning data in TRL's conventions, tokenized as TRL 1.16's ``SFTTrainer`` does.

Accepted example formats (TRL's dataset conventions):

* language modeling, plain: ``{"text": str}`` (the column is ``text_field``);
* language modeling, conversational: ``{"messages": [{"role", "content"}, ...]}`` (ShareGPT ``conversations`` with
  ``from`` / ``value`` is converted with ``trl.data_utils.maybe_convert_to_chatml``);
* prompt-completion, plain: ``{"prompt": str, "completion": str}``;
* prompt-completion, conversational: the same keys holding message lists.

Sources: ``"instructions"`` (the embedded instruction task of :func:`instruction_examples`, no files), a local
``.jsonl`` / ``.json`` / ``.parquet`` file, or a Hugging Face dataset name (``datasets.load_dataset``), read as
preference data is (:func:`~lightning_llm.data.preference.load_records`).

Tokenization (TRL 1.16 ``SFTTrainer._prepare_dataset``):

* plain examples: the eos token's TEXT is appended to ``text`` / ``completion`` unless it already ends with it; the
  text (or ``prompt`` and ``prompt + completion``) is encoded with the tokenizer's own special-token behaviour;
* conversational examples: rendered with the chat template (the prompt with ``add_generation_prompt=True``), encoded
  WITHOUT special tokens (the template writes them);
* prompt-completion: the completion starts where the encoded prompt and the encoded prompt + completion diverge
  (``common_prefix_length``); with ``completion_only_loss`` (default) only completion tokens are scored;
* ``assistant_only_loss`` (conversational data): only the tokens of assistant messages are scored. TRL takes them from
  a template's ``{% generation %}`` blocks (``return_assistant_tokens_mask``); here they are found for ANY template by
  rendering the conversation up to each assistant message with and without that message: the characters the message
  adds are its tokens (for a template with ``{% generation %}`` around each assistant turn the two agree token by
  token, which the tests check against ``transformers``);
* ``max_length`` cuts each sequence (``truncation_mode`` ``"keep_start"`` or ``"keep_end"``) and drops sequences left
  with no scored token.

Labels follow ``transformers``: ``labels[t]`` is token t itself (``-100`` = not scored); a batch holds
``targets[t] = labels[t + 1]`` (the next token, what :class:`~lightning_llm.nn.Transformer` scores).

Packing (``packing=True``): the tokenized examples are put into rows of ``max_length`` tokens by best fit decreasing
(TRL's ``"bfd"``); each row carries ``position_ids`` restarting at 0 per example and ``segment_ids`` (the example of
each token), so the model attends only within an example and the last token of one example does not predict the
first of the next. A packed row gives every example the loss it has alone.

Batches: ``input_ids (B, T)``, ``targets (B, T)``, ``attention_mask (B, T)`` and, when packed, ``position_ids (B, T)``
and ``segment_ids (B, T)`` (``-1`` on padding).

Notation: B batch of rows, T padded row length.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_llm.data.preference import (
    ChatTemplate,
    _check_positive_ints,
    _common_prefix,
    _ItemsDataset,
    _LazyTemplate,
    _TokenizedSplits,
    encode_text,
)
from lightning_llm.data.synthetic import char_tokenizer
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.ops import IGNORE_INDEX

__all__ = [
    "INSTRUCTION_CHARS",
    "SFTDataModule",
    "SFTDataset",
    "collate_sft",
    "instruction_examples",
    "pack_examples",
    "tokenize_sft_example",
]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ embedded task
_LETTERS = "abcdefgh"
_TASKS = {
    "reverse": lambda s: s[::-1],
    "copy": lambda s: s,
    "sort": lambda s: "".join(sorted(s)),
}
#: every character the embedded instruction task and the default chat template write
INSTRUCTION_CHARS = "abcdefghijklmnopqrstuvwxyz: \n"


def instruction_examples(n: int, seed: int = 0, conversational: bool = True) -> list[dict[str, Any]]:
    """``n`` instruction-following examples: ``"reverse: cbfg"`` -> ``"gfbc"`` (tasks reverse, copy, sort over 3-6
    letters from ``a..h``), deterministic in ``seed``; prompt-completion format, as messages when ``conversational``."""
    _check_positive_ints("instruction_examples", {"n": n})
    rng = random.Random(f"instructions-{seed}")
    out = []
    for _ in range(n):
        task = rng.choice(sorted(_TASKS))
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
        prompt, completion = f"{task}: {word}", _TASKS[task](word)
        if conversational:
            out.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            out.append({"prompt": prompt + "\n", "completion": completion})
    return out


# ------------------------------------------------------------------------------------------------ tokenization
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _assistant_mask(messages: list[dict[str, Any]], template: Any, text: str, tokenizer: Tokenizer) -> list[int]:
    """1 on the tokens of ``text`` (the rendered ``messages``) that the assistant messages add (see the module doc)."""
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = template.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        upto = template.apply_chat_template(messages[: i + 1])
        start = _common_prefix(before, upto)
        if upto != text[: len(upto)]:
            raise ValueError(
                "assistant_only_loss: the chat template renders a conversation's beginning differently from the "
                "whole conversation, so assistant turns cannot be located; use completion_only_loss with "
                "prompt/completion data, or a template whose renderings extend each other."
            )
        spans.append((start, len(upto)))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    return [int(any(s < e_tok and b_tok < e for s, e in spans)) for b_tok, e_tok in encoding.offsets]


def tokenize_sft_example(
    example: dict[str, Any],
    tokenizer: Tokenizer,
    template: Any,
    text_field: str = "text",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = False,
) -> dict[str, list[int]]:
    """One TRL-format SFT example -> ``{"input_ids", "labels"}`` (``labels`` unshifted, ``-100`` = not scored).

    Raises:
        ValueError: none of the known columns, or ``assistant_only_loss`` on plain text.
    """
    if "conversations" in example and "messages" not in example:
        from trl.data_utils import maybe_convert_to_chatml

        example = maybe_convert_to_chatml(dict(example))
    mask: list[int] | None = None
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if _is_messages(prompt) or _is_messages(completion):
            if not (_is_messages(prompt) and _is_messages(completion)):
                raise TypeError("SFT: `prompt` and `completion` must both be text or both be lists of messages.")
            prompt_ids = encode_text(tokenizer, template.apply_chat_template(prompt, add_generation_prompt=True), False)
            full = template.apply_chat_template(prompt + completion)
            ids = encode_text(tokenizer, full, False)
            if assistant_only_loss:
                mask = _assistant_mask(prompt + completion, template, full, tokenizer)
        else:
            if assistant_only_loss:
                raise ValueError("SFT: `assistant_only_loss=True` needs conversational data (lists of messages).")
            eos = tokenizer.id_to_token(tokenizer.eos_id)
            completion = completion if completion.endswith(eos) else completion + eos
            prompt_ids = encode_text(tokenizer, prompt, True)
            ids = encode_text(tokenizer, prompt + completion, True)
        n = _common_prefix(prompt_ids, ids)
        if completion_only_loss:
            completion_mask = [0] * n + [1] * (len(ids) - n)
            mask = completion_mask if mask is None else [a & b for a, b in zip(mask, completion_mask, strict=True)]
    elif "messages" in example:
        messages = example["messages"]
        if not _is_messages(messages):
            raise TypeError(f"SFT: `messages` must be a list of {{'role', 'content'}} dicts, got {messages!r}.")
        full = template.apply_chat_template(messages)
        ids = encode_text(tokenizer, full, False)
        if assistant_only_loss:
            mask = _assistant_mask(messages, template, full, tokenizer)
    elif text_field in example:
        if assistant_only_loss:
            raise ValueError("SFT: `assistant_only_loss=True` needs conversational data (lists of messages).")
        text = example[text_field]
        eos = tokenizer.id_to_token(tokenizer.eos_id)
        ids = encode_text(tokenizer, text if text.endswith(eos) else text + eos, True)
    else:
        raise ValueError(
            f"SFT: an example needs one of the columns 'prompt' + 'completion', 'messages' (or 'conversations') or "
            f"{text_field!r} (text_field), got {sorted(example)}. Rename the dataset's columns to TRL's names or set "
            "`text_field`."
        )
    if assistant_only_loss and mask is not None and not any(mask):
        raise ValueError("SFT: assistant_only_loss=True but an example has no assistant message to score.")
    labels = list(ids) if mask is None else [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": list(ids), "labels": labels}


def truncate_example(item: dict[str, list[int]], max_length: int | None, mode: str) -> dict[str, list[int]] | None:
    """Cut to ``max_length`` (``keep_start`` / ``keep_end``); ``None`` when no scored token is left (TRL drops it)."""
    if max_length is not None and len(item["input_ids"]) > max_length:
        sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        item = {"input_ids": item["input_ids"][sl], "labels": item["labels"][sl]}
    if all(label == IGNORE_INDEX for label in item["labels"][1:]):  # labels[0] is never a target of anything
        return None
    return item


def pack_examples(items: Sequence[dict[str, list[int]]], max_length: int) -> list[list[dict[str, list[int]]]]:
    """Best fit decreasing (TRL's ``"bfd"``): each row is a list of examples whose lengths sum to <= ``max_length``
    (longer examples are cut to ``max_length`` first)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    rows: list[list[dict[str, list[int]]]] = []
    room: list[int] = []
    for i in order:
        item = {k: v[:max_length] for k, v in items[i].items()}
        n = len(item["input_ids"])
        best = min((j for j in range(len(rows)) if room[j] >= n), key=lambda j: room[j], default=None)
        if best is None:
            rows.append([item])
            room.append(max_length - n)
        else:
            rows[best].append(item)
            room[best] -= n
    return rows


class SFTDataset(_ItemsDataset):
    """Tokenized examples (``{"input_ids", "labels"}``), or packed rows (lists of them)."""


def _next_token_targets(labels: list[int]) -> list[int]:
    """``targets[t] = labels[t + 1]``; the last token predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


def collate_sft(items: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples (or packed rows: lists of examples) into a batch (see the module docstring)."""
    packed = isinstance(items[0], list)
    rows = items if packed else [[it] for it in items]
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    b = len(rows)
    batch = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        "targets": torch.full((b, width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((b, width), dtype=torch.long),
    }
    if packed:
        batch["position_ids"] = torch.zeros((b, width), dtype=torch.long)
        batch["segment_ids"] = torch.full((b, width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for j, ex in enumerate(row):
            n = len(ex["input_ids"])
            sl = slice(start, start + n)
            batch["input_ids"][i, sl] = torch.as_tensor(ex["input_ids"])
            batch["targets"][i, sl] = torch.as_tensor(_next_token_targets(ex["labels"]))
            batch["attention_mask"][i, sl] = 1
            if packed:
                batch["position_ids"][i, sl] = torch.arange(n)
                batch["segment_ids"][i, sl] = j
            start += n
    return batch


class SFTDataModule(_TokenizedSplits):
    """Supervised fine-tuning data for :class:`~lightning_llm.modules.SFT` (formats: see the module docstring).

    Args:
        dataset: ``"instructions"`` (embedded task), a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a Hugging
            Face dataset name.
        val_split: the validation split of a Hugging Face dataset; with ``None`` (or a file), ``val_fraction`` of the
            training examples is held out (deterministic in ``seed``).
        text_field: the column of plain language-modeling text (TRL's ``dataset_text_field``).
        completion_only_loss: score only completion tokens of prompt-completion data (TRL's default).
        assistant_only_loss: score only assistant-message tokens of conversational data.
        max_length: token limit per example (TRL's default 1024), and the row length when packing.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.
        packing: pack several examples per row (positions restart, no attention across examples).
        num_train, num_val: sizes of the embedded task.
        batch_size: rows per batch (per process).
        **kwargs: the shared arguments of :class:`~lightning_llm.data.preference._TokenizedSplits`
            (``dataset_config``, ``train_split``, ``val_dataset``, ``val_fraction``, ``tokenizer``, ``tokenizer_vocab_size``,
            ``chat_template`` -- ``None``: the Hugging Face tokenizer's own, else the default template --,
            ``num_workers``, ``seed``).
    """

    _collate_items = staticmethod(collate_sft)

    def __init__(
        self,
        dataset: str = "instructions",
        val_split: str | None = "test",
        text_field: str = "text",
        completion_only_loss: bool = True,
        assistant_only_loss: bool = False,
        max_length: int | None = 1024,
        truncation_mode: str = "keep_start",
        packing: bool = False,
        num_train: int = 2048,
        num_val: int = 256,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._check_positive(max_length=max_length or None, batch_size=batch_size, num_train=num_train, num_val=num_val)
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"SFTDataModule: `truncation_mode` must be 'keep_start' or 'keep_end', got {truncation_mode!r}."
            )
        if packing and max_length is None:
            raise ValueError("SFTDataModule: `packing=True` needs `max_length` (the packed row length); set it.")
        self._records: dict[str, list[dict[str, Any]]] | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.hparams.dataset == "instructions"

    @property
    def block_size(self) -> int | None:
        return self.hparams.max_length

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None and self.is_synthetic and self.hparams.tokenizer in (None, "char"):
            self._tokenizer = char_tokenizer(chars=INSTRUCTION_CHARS)
        return super().tokenizer

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """The raw train / val examples (loaded once)."""
        if self._records is None:
            self._records = self._read_rows(instruction_examples, val_seed=10_000)
        return self._records

    def _tokenizer_texts(self) -> list[str]:
        out = []
        for ex in self.records()["train"]:
            for key in ("prompt", "completion", "messages", self.hparams.text_field):
                value = ex.get(key)
                if isinstance(value, str):
                    out.append(value)
                elif isinstance(value, list):
                    out.extend(str(m.get("content", "")) for m in value if isinstance(m, dict))
        return out

    @property
    def template(self) -> ChatTemplate:
        """The chat template of conversational data; a Hugging Face tokenizer without one (and no ``chat_template``)
        is an error rather than a silent fallback (this project's own tokenizers use the default format)."""
        spec = self.hparams.tokenizer
        if self._template is None and self.hparams.chat_template is None and isinstance(spec, str) and spec != "char":
            from lightning_llm.data.tokenizer import SPECIAL_IDS_FILE

            ours = (Path(spec).expanduser() / SPECIAL_IDS_FILE).is_file()
            if not ours and ChatTemplate.from_pretrained(spec) is None:
                raise ValueError(
                    f"SFTDataModule: the data is conversational but the tokenizer {spec!r} has no chat template. Pass "
                    "`chat_template` (a Jinja string; lightning_llm.data.preference.DEFAULT_CHAT_TEMPLATE renders "
                    "'role: content' lines), or use prompt/completion text data."
                )
        return super().template

    def tokenized(self, split: str) -> list[dict[str, list[int]]]:
        """The split's examples tokenized and truncated (before packing)."""
        hp = self.hparams
        template = _LazyTemplate(self)
        items = []
        for ex in self.records()[split]:
            item = tokenize_sft_example(
                ex, self.tokenizer, template, hp.text_field, hp.completion_only_loss, hp.assistant_only_loss
            )
            item = truncate_example(item, None if hp.packing else hp.max_length, hp.truncation_mode)
            if item is not None:
                items.append(item)
        if not items:
            raise ValueError(f"SFTDataModule: no {split} example has a token to score (check max_length / masks).")
        return items

    def _build_dataset(self, split: str) -> SFTDataset:
        items = self.tokenized(split)
        if self.hparams.packing:
            return SFTDataset(pack_examples(items, self.hparams.max_length))
        return SFTDataset(items)
