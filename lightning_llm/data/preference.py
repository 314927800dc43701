"""``PreferenceDataModule``: pairwise preference data in TRL's conventions, for reward models and DPO.

Accepted example formats (TRL's dataset conventions, the ecosystem standard):

* standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
* standard, implicit prompt: ``{"chosen": str, "rejected": str}`` (the shared prefix is the prompt,
  ``trl.data_utils.maybe_extract_prompt``);
* conversational: the same keys holding lists of ``{"role", "content"}`` messages, rendered to text with a chat
  template through ``trl.data_utils.maybe_apply_chat_template``;
* an optional ``"margin"`` column (float), used by the reward model's Bradley-Terry loss.

Sources: ``"synthetic"`` (the embedded letters task of :mod:`lightning_llm.data.synthetic`, no files), a local
``.jsonl`` / ``.json`` file, or a Hugging Face dataset name; files and names are both read with
``datasets.load_dataset`` (the real path).

Tokenisation (as TRL's DPO / reward trainers): prompt and completion are encoded separately; ``eos`` is appended to
each completion; the prompt is truncated from the LEFT to ``max_prompt_length`` and the completion from the right so
that prompt + completion fit ``max_length``.

Batches (right padded with ``pad_id``; ``X`` is ``chosen`` or ``rejected``, both padded to the same width L):
``X_input_ids (B, L)``, ``X_attention_mask (B, L)`` (1 on real tokens), ``X_loss_mask (B, L)`` (1 on completion
tokens, eos included), ``margin (B,)`` when every example has one, and ``index (B,)`` (the example's position in its
split, used to cache reference log-probabilities).

Notation: B batch of pairs, L padded sequence length.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_llm.data.synthetic import SYNTHETIC_CHARS, char_tokenizer, synthetic_preference_examples
from lightning_llm.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatTemplate",
    "PreferenceDataModule",
    "PreferenceDataset",
    "collate_preference",
    "load_records",
    "resolve_tokenizer",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ chat template
class ChatTemplate:
    """A minimal chat template with the ``apply_chat_template`` interface ``trl.data_utils`` calls.

    Our tokenizers have no chat template of their own; this one renders every message as ``"{role}: {content}\\n"``
    and the generation prompt as ``"assistant: "``. A Jinja template string (the Hugging Face format, variables
    ``messages`` and ``add_generation_prompt``) can be given instead.

    Args:
        template: ``None`` for the default format, or a Jinja chat template string.
    """

    def __init__(self, template: str | None = None) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"ChatTemplate: `template` must be None or a Jinja string, got {type(template).__name__}.")
        self.template = template
        self._jinja = None
        if template is not None:
            import jinja2

            self._jinja = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        tools: Any = None,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        if tokenize:
            raise ValueError("ChatTemplate.apply_chat_template: only tokenize=False is supported (text out).")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a {{'role', 'content'}} dict, got {m!r}.")
        if self._jinja is not None:
            text = self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if add_generation_prompt:
                text += "assistant: "
        if continue_final_message and messages:
            last = messages[-1]["content"]
            cut = text.rfind(last)
            if cut >= 0:
                text = text[: cut + len(last)]
        return text


def _is_conversational(example: dict[str, Any]) -> bool:
    from trl.data_utils import is_conversational

    return is_conversational(example)


def to_text_example(example: dict[str, Any], template: ChatTemplate) -> dict[str, Any]:
    """One TRL-format preference example -> ``{"prompt": str, "chosen": str, "rejected": str[, "margin"]}``."""
    missing = {"chosen", "rejected"} - set(example)
    if missing:
        raise ValueError(
            f"A preference example needs 'chosen' and 'rejected' (and usually 'prompt'), missing {sorted(missing)} "
            f"in keys {sorted(example)}. Rename the dataset's columns to TRL's names."
        )
    keep = {k: example[k] for k in ("prompt", "chosen", "rejected") if k in example}
    # plain-text rows with an explicit prompt need no trl helper (and skip importing transformers)
    conversational = any(isinstance(v, list) for v in keep.values()) and _is_conversational(keep)
    if "prompt" not in keep or (conversational and isinstance(keep.get("prompt"), str)):
        from trl.data_utils import maybe_extract_prompt

        keep = maybe_extract_prompt(keep)
    if conversational:
        from trl.data_utils import maybe_apply_chat_template

        keep = maybe_apply_chat_template(keep, template)
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(keep.get(key), str):
            raise TypeError(
                f"Preference example field {key!r} must be text or a list of messages, got {keep.get(key)!r}."
            )
    out: dict[str, Any] = {"prompt": keep["prompt"], "chosen": keep["chosen"], "rejected": keep["rejected"]}
    if example.get("margin") is not None:
        out["margin"] = float(example["margin"])
    return out


# ------------------------------------------------------------------------------------------------ loading
def _looks_like_file(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or os.path.sep in name or Path(name).exists()


def load_records(dataset: str, split: str, dataset_config: str | None = None) -> list[dict[str, Any]]:
    """Read one split of a local ``.jsonl`` / ``.json`` file or a Hugging Face dataset with ``datasets.load_dataset``."""
    import datasets

    if _looks_like_file(dataset):
        path = Path(dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"`dataset`={dataset!r} looks like a file path but does not exist.")
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        try:
            ds = datasets.load_dataset(dataset, dataset_config, split=split)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument and the fix
            raise ValueError(
                f"`dataset`={dataset!r} (split {split!r}) could not be loaded with datasets.load_dataset: {err}. Pass "
                "'synthetic', a local .jsonl file, or a Hugging Face dataset name reachable from here."
            ) from err
    return [dict(row) for row in ds]


def resolve_tokenizer(
    spec: str | Tokenizer | None, texts: Sequence[str], synthetic: bool, bpe_vocab_size: int
) -> Tokenizer:
    """``"char"`` -> character tokenizer (the fixed synthetic set for the synthetic task, else the texts' characters);
    ``None`` -> the char tokenizer for synthetic data, otherwise a byte-level BPE trained on ``texts`` (cached); a
    path or hub name -> :meth:`Tokenizer.from_pretrained`; a :class:`Tokenizer` is returned as is."""
    if spec is None:
        spec = "char" if synthetic else None
    if spec == "char":
        return char_tokenizer(chars=SYNTHETIC_CHARS) if synthetic else char_tokenizer(texts=texts)
    return load_tokenizer(spec, train_texts=None if spec is not None else list(texts), vocab_size=bpe_vocab_size)


def _split(records: list[dict[str, Any]], val_fraction: float, seed: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    n_val = max(1, int(round(len(records) * val_fraction))) if val_fraction > 0 else 0
    if n_val >= len(records):
        raise ValueError(f"val_fraction={val_fraction} leaves no training example out of {len(records)}.")
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


# ------------------------------------------------------------------------------------------------ dataset
def encode_pair(
    example: dict[str, Any], tokenizer: Tokenizer, max_length: int, max_prompt_length: int
) -> dict[str, Any] | None:
    """Tokenise one text example (see the module docstring); ``None`` when no completion token fits."""
    prompt = tokenizer.encode(example["prompt"], add_bos=tokenizer.bos_id is not None)
    prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    room = max_length - len(prompt)
    if room < 1:
        return None
    out: dict[str, Any] = {"prompt_ids": prompt}
    for key in ("chosen", "rejected"):
        out[f"{key}_ids"] = tokenizer.encode(example[key], add_eos=True)[:room]
    if "margin" in example:
        out["margin"] = example["margin"]
    return out


class PreferenceDataset(Dataset):
    """Tokenised preference pairs (a list of :func:`encode_pair` dicts)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.items[index], "index": index}


def collate_preference(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected sequences to one common width L (see the module docstring)."""
    width = max(len(it["prompt_ids"]) + max(len(it["chosen_ids"]), len(it["rejected_ids"])) for it in items)
    batch: dict[str, torch.Tensor] = {}
    for key in ("chosen", "rejected"):
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(items), width), dtype=torch.long)
        loss = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            p, c = it["prompt_ids"], it[f"{key}_ids"]
            ids[i, : len(p) + len(c)] = torch.as_tensor(p + c, dtype=torch.long)
            attn[i, : len(p) + len(c)] = 1
            loss[i, len(p) : len(p) + len(c)] = 1
        batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"], batch[f"{key}_loss_mask"] = ids, attn, loss
    if all("margin" in it for it in items):
        batch["margin"] = torch.tensor([float(it["margin"]) for it in items], dtype=torch.float32)
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch


class _Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_preference(items, self.pad_id)


def _check_positive_ints(owner: str, values: dict[str, Any]) -> None:
    """Raise a ValueError naming ``owner`` and the argument for each value that is not a positive ``int``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: `{name}` must be a positive integer, got {value!r}.")


class _TokenizedSplits(L.LightningDataModule):
    """The glue :class:`PreferenceDataModule` and :class:`~lightning_llm.data.prompts.PromptDataModule` share: a
    tokenizer resolved on first use (:func:`resolve_tokenizer`), train / val datasets built once, and their loaders.

    Subclasses save hyperparameters including ``tokenizer``, ``tokenizer_vocab_size``, ``batch_size`` and
    ``num_workers``, and define ``is_synthetic``, :meth:`_tokenizer_texts`, :meth:`_build_dataset` and
    :meth:`_collate`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tokenizer: Tokenizer | None = None
        self._datasets: dict[str, Dataset] = {}

    @property
    def is_synthetic(self) -> bool:
        raise NotImplementedError

    def _tokenizer_texts(self) -> list[str]:
        """The texts a tokenizer is built from (when one is trained)."""
        raise NotImplementedError

    def _build_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _collate(self) -> Callable[[list[dict[str, Any]]], Any]:
        raise NotImplementedError

    def _drop_last(self, split: str, shuffle: bool) -> bool:
        return False

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(
                self.hparams.tokenizer, self._tokenizer_texts(), self.is_synthetic, self.hparams.tokenizer_vocab_size
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def dataset(self, split: str) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"{type(self).__name__}: `split` must be 'train' or 'val', got {split!r}.")
        if split not in self._datasets:
            self._datasets[split] = self._build_dataset(split)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        self.dataset("train")
        self.dataset("val")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate(),
            drop_last=self._drop_last(split, shuffle),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


class PreferenceDataModule(_TokenizedSplits):
    """Preference pairs for :class:`~lightning_llm.modules.RewardModel` and :class:`~lightning_llm.modules.DPO`.

    Args:
        dataset: ``"synthetic"`` (embedded letters task), a local ``.jsonl`` / ``.json`` path, or a Hugging Face
            dataset name (``datasets.load_dataset``).
        dataset_config: the Hugging Face dataset configuration name, if any.
        train_split, val_split: split names for Hugging Face datasets. When ``val_split`` is ``None`` (or the source
            is a single file), ``val_fraction`` of the training examples is held out (deterministic in ``seed``).
        val_dataset: a separate local file (or dataset name) for validation, instead of splitting.
        val_fraction: the held-out fraction when splitting.
        tokenizer: ``None`` (character tokenizer for ``"synthetic"``, else a byte-level BPE trained on the training
            texts), ``"char"``, a saved tokenizer directory, or a Hugging Face tokenizer path / name.
        tokenizer_vocab_size: BPE vocabulary size when a BPE is trained.
        chat_template: Jinja template for conversational data; ``None`` uses :class:`ChatTemplate`'s default.
        max_length, max_prompt_length: token limits (prompt truncated from the left, completion from the right).
        num_train, num_val: synthetic task sizes. synthetic_length, synthetic_min_gap: synthetic completion length and
            smallest score gap between chosen and rejected.
        batch_size, num_workers, seed: loader settings.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        val_dataset: str | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        chat_template: str | None = None,
        max_length: int = 128,
        max_prompt_length: int = 64,
        num_train: int = 2048,
        num_val: int = 256,
        synthetic_length: int = 8,
        synthetic_min_gap: int = 2,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_ints(
            "PreferenceDataModule",
            {
                "max_length": max_length,
                "max_prompt_length": max_prompt_length,
                "batch_size": batch_size,
                "num_train": num_train,
                "num_val": num_val,
            },
        )
        if max_prompt_length >= max_length:
            raise ValueError(
                f"PreferenceDataModule: `max_prompt_length` ({max_prompt_length}) must be < `max_length` "
                f"({max_length}) to leave room for the completion."
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"PreferenceDataModule: `val_fraction` must be in [0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.template = ChatTemplate(chat_template)
        self._texts: dict[str, list[dict[str, Any]]] | None = None

    # -------------------------------------------------------------------------------------------- text
    @property
    def is_synthetic(self) -> bool:
        return self.hparams.dataset == "synthetic"

    def text_examples(self) -> dict[str, list[dict[str, Any]]]:
        """The train / val examples as text (prompt, chosen, rejected[, margin]), loaded once."""
        if self._texts is None:
            hp = self.hparams
            if self.is_synthetic:
                raw = {
                    "train": synthetic_preference_examples(
                        hp.num_train, hp.seed, hp.synthetic_length, hp.synthetic_min_gap
                    ),
                    "val": synthetic_preference_examples(
                        hp.num_val, hp.seed + 1, hp.synthetic_length, hp.synthetic_min_gap
                    ),
                }
            else:
                train = load_records(hp.dataset, hp.train_split, hp.dataset_config)
                if hp.val_dataset is not None:
                    val = load_records(hp.val_dataset, hp.val_split or "train", hp.dataset_config)
                elif hp.val_split is not None and not _looks_like_file(hp.dataset):
                    val = load_records(hp.dataset, hp.val_split, hp.dataset_config)
                else:
                    train, val = _split(train, hp.val_fraction, hp.seed)
                raw = {"train": train, "val": val}
            self._texts = {split: [to_text_example(ex, self.template) for ex in rows] for split, rows in raw.items()}
            if not self._texts["train"]:
                raise ValueError(f"PreferenceDataModule: dataset {hp.dataset!r} has no training examples.")
        return self._texts

    # -------------------------------------------------------------------------------------------- tokenizer
    def _tokenizer_texts(self) -> list[str]:
        return [t for ex in self.text_examples()["train"] for t in (ex["prompt"], ex["chosen"], ex["rejected"])]

    # -------------------------------------------------------------------------------------------- datasets
    def _build_dataset(self, split: str) -> PreferenceDataset:
        hp = self.hparams
        items = [
            encode_pair(ex, self.tokenizer, hp.max_length, hp.max_prompt_length) for ex in self.text_examples()[split]
        ]
        kept = [it for it in items if it is not None]
        if len(kept) < len(items):
            log.warning(
                "PreferenceDataModule: dropped %d %s pairs with no room for a completion.",
                len(items) - len(kept),
                split,
            )
        return PreferenceDataset(kept)

    @property
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return _Collate(self.tokenizer.pad_id)

    def _collate(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return self.collate_fn
