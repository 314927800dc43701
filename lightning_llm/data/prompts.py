"""``PromptDataModule``: prompts for on-policy RL (PPO), batched as ``{"prompt": list[str], "prompt_ids": list[list[int]]}``.

Sources: an explicit list of prompts, ``"synthetic"`` (the embedded letters task of
:mod:`lightning_llm.data.synthetic`), a local ``.jsonl`` / ``.json`` file or a Hugging Face dataset with a prompt
column (read with ``datasets.load_dataset``).

Tokenization is that of TRL 1.16's online trainers (``GRPOTrainer._tokenize_prompts``, also RLOO's): a text prompt
is encoded with the tokenizer's own special-token behaviour (``tokenizer(text)``: a Llama-style BOS, nothing for
GPT-2-style tokenizers and this project's own); a conversational prompt (a list of ``{"role", "content"}``
messages, TRL's "prompt-only" format) is rendered with the chat template and the generation prompt, then encoded
without special tokens (``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``). The chat template is
chosen as in :mod:`lightning_llm.data.preference`.

Prompts stay as Python lists of token ids (no padding here): :func:`lightning_llm.nn.generate` left-pads them, which is
what batched KV-cache decoding needs.

Notation: B batch of prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

from lightning_llm.data.preference import _LazyTemplate, _split, _TokenizedSplits, encode_text
from lightning_llm.data.synthetic import synthetic_prompts

__all__ = ["PromptDataModule", "PromptDataset", "collate_prompts"]


def _prompt_text(row: Any, field: str, template: Any) -> tuple[str, bool]:
    """``(text, rendered)``: the prompt as text, and whether it is a rendered conversation (then encoded without the
    tokenizer's special tokens, which the template wrote)."""
    value = row.get(field) if isinstance(row, dict) else row
    if isinstance(value, str):
        return value, False
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return template.apply_chat_template(value, add_generation_prompt=True), True
    raise TypeError(
        f"A prompt must be a string or a list of chat messages; got {type(value).__name__} in field {field!r} of "
        f"{row!r}. Set `prompt_field` to the dataset's prompt column."
    )


class PromptDataset(Dataset):
    """Prompts as text and token ids."""

    def __init__(self, prompts: list[str], prompt_ids: list[list[int]]) -> None:
        self.prompts, self.prompt_ids = prompts, prompt_ids

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"prompt": self.prompts[index], "prompt_ids": self.prompt_ids[index]}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    """``[{"prompt", "prompt_ids"}] -> {"prompt": list[str], "prompt_ids": list[list[int]]}``."""
    return {"prompt": [it["prompt"] for it in items], "prompt_ids": [list(it["prompt_ids"]) for it in items]}


class PromptDataModule(_TokenizedSplits):
    """Prompts for :class:`~lightning_llm.modules.PPO`.

    Args:
        prompts: an explicit list of prompts (strings or message lists); overrides ``dataset``. Validation then uses
            ``val_fraction`` of them.
        dataset: ``"synthetic"``, a local ``.jsonl`` / ``.json`` path, or a Hugging Face dataset name.
        val_split: the validation split of a Hugging Face dataset (``None``: ``val_fraction`` is split off).
        prompt_field: the column holding prompts.
        num_train, num_val: synthetic task sizes.
        batch_size: prompts per rollout (per process).
        **kwargs: the shared arguments of :class:`~lightning_llm.data.preference._TokenizedSplits`
            (``dataset_config``, ``train_split``, ``val_dataset``, ``val_fraction``, ``tokenizer``, ``tokenizer_vocab_size``,
            ``chat_template``, ``num_workers``, ``seed``). The tokenizer must be the policy's (and the reward model's,
            when one is used).
    """

    def __init__(
        self,
        prompts: list[Any] | None = None,
        dataset: str = "synthetic",
        val_split: str | None = None,
        prompt_field: str = "prompt",
        num_train: int = 1024,
        num_val: int = 128,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if prompts is not None and (isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts):
            raise TypeError(f"PromptDataModule: `prompts` must be a non-empty list of prompts, got {prompts!r}.")
        super().__init__(**kwargs)
        self._check_positive(batch_size=batch_size, num_train=num_train, num_val=num_val)
        self._texts: dict[str, list[str]] | None = None
        self._rendered: dict[str, list[bool]] = {}

    @property
    def is_synthetic(self) -> bool:
        return self.hparams.prompts is None and self.hparams.dataset == "synthetic"

    def texts(self) -> dict[str, list[str]]:
        """Train / val prompt texts (chat templates applied), loaded once."""
        if self._texts is None:
            hp = self.hparams
            field = hp.prompt_field
            template = _LazyTemplate(self)
            if hp.prompts is not None:
                rows = [_prompt_text(p, field, template) for p in hp.prompts]
                if len(rows) == 1 or hp.val_fraction == 0:
                    train, val = rows, rows
                else:
                    train, val = _split(rows, hp.val_fraction, hp.seed)
            else:  # the embedded task (plain strings) or a dataset's rows
                raw = self._read_rows(synthetic_prompts)
                train, val = ([_prompt_text(r, field, template) for r in raw[k]] for k in ("train", "val"))
            self._rendered = {"train": [r for _, r in train], "val": [r for _, r in val]}
            self._texts = {"train": [t for t, _ in train], "val": [t for t, _ in val]}
        return self._texts

    def _tokenizer_texts(self) -> list[str]:
        return self.texts()["train"]

    def _build_dataset(self, split: str) -> PromptDataset:
        return self._encode(self.texts()[split], self._rendered[split], split)

    def _encode(self, texts: list[str], rendered: list[bool], split: str) -> PromptDataset:
        tok = self.tokenizer
        ids = [encode_text(tok, t, add_special_tokens=not r) for t, r in zip(texts, rendered)]
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"PromptDataModule: {len(empty)} {split} prompts encode to no tokens (first: {empty[0]}).")
        return PromptDataset(texts, ids)

    def predict_dataloader(self) -> DataLoader:
        """For ``predict``: every explicit prompt in the order given (no split), else the validation prompts."""
        hp = self.hparams
        if hp.prompts is not None:
            pairs = [_prompt_text(p, hp.prompt_field, _LazyTemplate(self)) for p in hp.prompts]
            texts, rendered = [t for t, _ in pairs], [r for _, r in pairs]
        else:
            texts, rendered = self.texts()["val"], self._rendered["val"]
        return DataLoader(
            self._encode(texts, rendered, "predict"),
            batch_size=hp.batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
            collate_fn=collate_prompts,
        )

    @property
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, list]]:
        """:func:`collate_prompts` (prompts stay unpadded lists)."""
        return collate_prompts

    def _drop_last(self, split: str, shuffle: bool) -> bool:
        return shuffle and len(self.dataset(split)) >= self.hparams.batch_size
