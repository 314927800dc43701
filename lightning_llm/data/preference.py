"""``PreferenceDataModule``: pairwise preference data in TRL's conventions, for reward models and DPO.

Accepted example formats (TRL's dataset conventions, the ecosystem standard):

* standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
* standard, implicit prompt: ``{"chosen": str, "rejected": str}`` (the shared prefix is the prompt,
  ``trl.data_utils.maybe_extract_prompt``);
* conversational: the same keys holding lists of ``{"role", "content"}`` messages;
* an optional ``"margin"`` column (float), used by the reward model's Bradley-Terry loss.

Sources: ``"synthetic"`` (the embedded letters task of :mod:`lightning_llm.data.synthetic`, no files), a local
``.jsonl`` / ``.json`` / ``.parquet`` file, or a Hugging Face dataset name (``org/name``); files and names are both
read with ``datasets.load_dataset`` (the real path, :func:`load_records`, shared with SFT and prompt data).

Tokenization is TRL 1.16's (``DPOTrainer._prepare_dataset``; ``RewardTrainer`` builds the same full sequences), so a
model sees the same token ids here as under TRL:

* standard examples: the eos token's TEXT is appended to ``chosen`` and ``rejected`` unless they already end with it;
  ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are each encoded with the tokenizer's OWN special-token
  behaviour (``tokenizer(text)``, i.e. ``add_special_tokens=True``): a Llama-style tokenizer adds its BOS, a
  GPT-2-style byte-level tokenizer adds nothing (its ``<|endoftext|>`` BOS is not prepended);
* conversational examples: rendered with the chat template (the prompt with ``add_generation_prompt=True``, and the
  whole prompt + chosen / prompt + rejected conversations), then encoded WITHOUT special tokens (the template writes
  them), as ``tokenizer.apply_chat_template(..., tokenize=True)``; no eos is appended;
* the completion starts where the encoded prompt and the encoded prompt + completion first differ (TRL's
  ``common_prefix_length``; tokens may merge across the boundary), so ``prompt_ids + chosen_ids`` is exactly the
  encoding of the whole text.

The chat template is, in order: ``chat_template`` (a Jinja string, rendered by ``transformers`` as
``apply_chat_template`` renders it, with the tokenizer's special tokens), the Hugging Face tokenizer's own template
(``tokenizer`` a Hugging Face directory or name), or :class:`ChatTemplate`'s default plain format.

Choices for this project's own tokenizers, which have no Hugging Face configuration to follow: the byte-level BPE
trained on the data and the character tokenizer of the synthetic task behave like GPT-2's tokenizer: no BOS (they have
none) and nothing added by ``add_special_tokens``; ``<|endoftext|>`` closes every standard completion; their chat
template is :class:`ChatTemplate`'s default (``"{role}: {content}\\n"`` per message, generation prompt
``"assistant: "``). Saved with :meth:`~lightning_llm.data.Tokenizer.save` and loaded by ``transformers``, they encode
the same way under TRL.

Length limits (TRL's defaults): ``truncation_mode="keep_start"`` (``DPOTrainer``): pairs whose prompt alone fills
``max_length`` are dropped, and prompt + completion is cut to its first ``max_length`` tokens;
``truncation_mode="filter"`` (``RewardTrainer``): pairs whose chosen or rejected sequence is longer than
``max_length`` are dropped. ``max_prompt_length`` (TRL 0.x, not in TRL 1.x; default off) first keeps only the last
``max_prompt_length`` prompt tokens.

Batches (right padded with ``pad_id``; ``X`` is ``chosen`` or ``rejected``, both padded to the same width L):
``X_input_ids (B, L)``, ``X_attention_mask (B, L)`` (1 on real tokens), ``X_loss_mask (B, L)`` (1 on completion
tokens, eos included; TRL's ``completion_mask``), ``margin (B,)`` when every example has one, and ``index (B,)`` (the
example's position in its split, used to cache reference log-probabilities).

Notation: B batch of pairs, L padded sequence length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_llm.data.synthetic import SYNTHETIC_CHARS, char_tokenizer, synthetic_preference_examples
from lightning_llm.data.tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "TRUNCATION_MODES",
    "ChatTemplate",
    "PreferenceDataModule",
    "PreferenceDataset",
    "collate_preference",
    "encode_pair",
    "encode_text",
    "load_records",
    "resolve_chat_template",
    "resolve_tokenizer",
    "to_text_example",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ chat template
#: :class:`ChatTemplate`'s default format as a Hugging Face Jinja chat template: set it as ``tokenizer.chat_template``
#: to render conversations elsewhere (e.g. in TRL) exactly as here.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class ChatTemplate:
    """A chat template with the ``apply_chat_template`` interface ``trl.data_utils`` calls (text out).

    Without a template, every message is rendered as ``"{role}: {content}\\n"`` and the generation prompt as
    ``"assistant: "`` (the format for this project's own tokenizers, which have no chat template; as Jinja:
    :data:`DEFAULT_CHAT_TEMPLATE`). A Jinja template string (the Hugging Face format) is rendered as ``transformers``
    renders it (``render_jinja_template``, the code behind ``PreTrainedTokenizerBase.apply_chat_template``), with
    ``special_tokens`` (``bos_token``, ``eos_token``, ...) as template variables; without ``transformers``, by a plain
    ``jinja2`` environment.

    Args:
        template: ``None`` for the default format, or a Jinja chat template string.
        special_tokens: template variables naming the tokenizer's special tokens, e.g.
            ``{"bos_token": "<s>", "eos_token": "</s>"}`` (as ``tokenizer.special_tokens_map``).
    """

    def __init__(self, template: str | None = None, special_tokens: dict[str, Any] | None = None) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"ChatTemplate: `template` must be None or a Jinja string, got {type(template).__name__}.")
        if special_tokens is not None and not isinstance(special_tokens, dict):
            raise TypeError(
                f"ChatTemplate: `special_tokens` must be a dict such as {{'eos_token': '</s>'}}, got {special_tokens!r}."
            )
        self.template = template
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_pretrained(cls, path_or_name: str) -> ChatTemplate | None:
        """The chat template of a Hugging Face tokenizer (``transformers.AutoTokenizer``), or ``None`` when it has none
        (or cannot be read as one, e.g. a directory written by :meth:`~lightning_llm.data.Tokenizer.save`)."""
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path_or_name)
        except Exception:  # noqa: BLE001 - no transformers / not a Hugging Face tokenizer: no template of its own
            return None
        template = getattr(hf, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if not isinstance(template, str):
            return None
        special = {k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str)}
        return cls(template, special)

    @staticmethod
    def special_tokens_of(tokenizer: Tokenizer) -> dict[str, str]:
        """``{"bos_token", "eos_token", "pad_token"}`` of one of our tokenizers (the entries it has)."""
        out = {}
        for key, tid in (
            ("bos_token", tokenizer.bos_id),
            ("eos_token", tokenizer.eos_id),
            ("pad_token", tokenizer.pad_id),
        ):
            token = None if tid is None else tokenizer.id_to_token(tid)
            if token is not None:
                out[key] = token
        return out

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
        if not messages:
            raise ValueError("ChatTemplate.apply_chat_template: `messages` is empty; pass at least one message.")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a {{'role', 'content'}} dict, got {m!r}.")
        if self.template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if add_generation_prompt:
                text += "assistant: "
            if continue_final_message:
                last = messages[-1]["content"]
                cut = text.rfind(last)
                if cut >= 0:
                    text = text[: cut + len(last)]
            return text
        variables = {**self.special_tokens, **kwargs}
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            return self._render_jinja2(messages, tools, add_generation_prompt, continue_final_message, variables)
        rendered, _ = render_jinja_template(
            conversations=[list(messages)],
            tools=tools,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **variables,
        )
        return rendered[0]

    def _render_jinja2(
        self, messages: Sequence[dict[str, str]], tools: Any, gen: bool, cont: bool, variables: dict[str, Any]
    ) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        text = env.from_string(self.template).render(
            messages=list(messages), tools=tools, add_generation_prompt=gen, **variables
        )
        if cont and messages:
            last = messages[-1]["content"]
            cut = text.rfind(last)
            if cut >= 0:
                text = text[: cut + len(last)]
        return text


def _is_conversational(example: dict[str, Any]) -> bool:
    from trl.data_utils import is_conversational

    return is_conversational(example)


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences (token ids or characters)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def to_text_example(example: dict[str, Any], template: ChatTemplate) -> dict[str, Any]:
    """One TRL-format preference example -> text (see the module docstring for how it is encoded).

    Returns:
        ``{"prompt", "chosen", "rejected"[, "margin"]}`` for standard examples (the completions without the eos, which
        :func:`encode_pair` appends); for conversational ones also ``"prompt_chosen"`` and ``"prompt_rejected"``, the
        rendered whole conversations that are encoded, with ``prompt`` rendered with the generation prompt and
        ``chosen`` / ``rejected`` the text after the part shared with the prompt.
    """
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
    out: dict[str, Any]
    if conversational:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(keep.get(key), list):
                raise TypeError(
                    f"Conversational preference example field {key!r} must be a list of messages, got "
                    f"{keep.get(key)!r}."
                )
        prompt = template.apply_chat_template(keep["prompt"], add_generation_prompt=True)
        full = {k: template.apply_chat_template(keep["prompt"] + keep[k]) for k in ("chosen", "rejected")}
        out = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            out[key] = full[key][_common_prefix(prompt, full[key]) :]
        out["prompt_chosen"], out["prompt_rejected"] = full["chosen"], full["rejected"]
    else:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(keep.get(key), str):
                raise TypeError(
                    f"Preference example field {key!r} must be text or a list of messages, got {keep.get(key)!r}."
                )
        out = {"prompt": keep["prompt"], "chosen": keep["chosen"], "rejected": keep["rejected"]}
    if example.get("margin") is not None:
        out["margin"] = float(example["margin"])
    return out


# ------------------------------------------------------------------------------------------------ loading
def _looks_like_file(name: str) -> bool:
    """A local file rather than a hub name: a data suffix, an explicit path (``/``, ``./``, ``~``) or an existing
    one; a hub name's ``org/name`` slash alone does not make it a path."""
    suffixed = name.endswith((".jsonl", ".json", ".parquet")) or name.startswith(("/", "./", "../", "~"))
    return suffixed or Path(name).expanduser().exists()


def load_records(dataset: str, split: str, dataset_config: str | None = None) -> list[dict[str, Any]]:
    """Read one split of a local ``.jsonl`` / ``.json`` / ``.parquet`` file (the whole file) or a Hugging Face dataset
    with ``datasets.load_dataset``; text files are read by :func:`~lightning_llm.data.text.load_local_file`, which
    names the bad line of a malformed one."""
    import datasets

    if _looks_like_file(dataset):
        path = Path(dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"`dataset`={dataset!r} looks like a file path but does not exist.")
        from lightning_llm.data.text import diagnose_local_file, load_local_file

        if path.suffix == ".parquet":  # binary: nothing to diagnose line by line
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            ds = load_local_file(path, dataset, split="train")
        try:  # pyarrow reads bytes that are not UTF-8 and only fails when a row is decoded
            return [dict(row) for row in ds]
        except UnicodeDecodeError as err:
            raise ValueError(diagnose_local_file(path) or f"`dataset`={dataset!r}: {err}") from None
    else:
        try:
            ds = datasets.load_dataset(dataset, dataset_config, split=split)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument and the fix
            raise ValueError(
                f"`dataset`={dataset!r} (split {split!r}) could not be loaded with datasets.load_dataset: {err}. Pass "
                "the embedded task ('synthetic'; 'instructions' for SFT), a local .jsonl/.json/.parquet file, or a "
                "Hugging Face dataset name reachable from here."
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


def resolve_chat_template(
    chat_template: str | None, tokenizer_spec: str | Tokenizer | None, tokenizer: Tokenizer | None = None
) -> ChatTemplate:
    """The chat template a data module renders conversations with (the module docstring's order).

    Args:
        chat_template: an explicit Jinja template string, or ``None``.
        tokenizer_spec: the data module's ``tokenizer`` argument; a Hugging Face path or name contributes its own chat
            template and special-token names.
        tokenizer: the resolved tokenizer, if known (its special tokens are the template variables otherwise).
    """
    own = (
        ChatTemplate.from_pretrained(tokenizer_spec)
        if isinstance(tokenizer_spec, str) and tokenizer_spec != "char"
        else None
    )
    if chat_template is None:
        return own if own is not None else ChatTemplate()
    if own is not None:
        special = own.special_tokens
    elif tokenizer is not None:
        special = ChatTemplate.special_tokens_of(tokenizer)
    else:  # this project's own tokenizers: <|endoftext|> is eos and pad
        special = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    return ChatTemplate(chat_template, special)


class _LazyTemplate:
    """Resolves a data module's chat template on the first conversation it renders (plain data never loads one)."""

    def __init__(self, owner: _TokenizedSplits) -> None:
        self.owner = owner

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        return self.owner.template.apply_chat_template(*args, **kwargs)


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
TRUNCATION_MODES = ("keep_start", "filter")


def encode_text(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer(text)["input_ids"]`` as ``transformers`` computes it: with ``add_special_tokens=True`` the
    tokenizer's own post-processor decides which special tokens to add (a Llama-style BOS; nothing for GPT-2-style
    byte-level tokenizers and this project's own); special tokens written in the text (an eos appended as text, a chat
    template's markers) are always recognised."""
    if not isinstance(text, str):
        raise TypeError(f"encode_text: `text` must be a str, got {type(text).__name__}.")
    return tokenizer.backend.encode(text, add_special_tokens=add_special_tokens).ids


def encode_pair(
    example: dict[str, Any],
    tokenizer: Tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, Any] | None:
    """Tokenize one text example (from :func:`to_text_example`) as TRL 1.16 does (see the module docstring).

    Returns:
        ``{"prompt_ids", "chosen_ids", "rejected_ids"[, "margin"]}``, with ``prompt_ids + chosen_ids`` the encoding of
        the whole prompt + chosen text; ``None`` when the pair is dropped by the length rules.
    """
    if "prompt_chosen" in example:  # a rendered conversation: the chat template wrote the special tokens
        special = False
        texts = (example["prompt"], example["prompt_chosen"], example["prompt_rejected"])
    else:
        eos = tokenizer.id_to_token(tokenizer.eos_id)
        special = True
        completions = [c if c.endswith(eos) else c + eos for c in (example["chosen"], example["rejected"])]
        texts = (example["prompt"], *(example["prompt"] + c for c in completions))
    prompt, prompt_chosen, prompt_rejected = (encode_text(tokenizer, t, special) for t in texts)
    n = min(_common_prefix(prompt, prompt_chosen), _common_prefix(prompt, prompt_rejected))
    prompt_ids, chosen_ids, rejected_ids = prompt_chosen[:n], prompt_chosen[n:], prompt_rejected[n:]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    if max_length is not None:
        if truncation_mode == "filter":  # RewardTrainer: drop pairs longer than max_length
            if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length:
                return None
        else:  # DPOTrainer "keep_start": drop a prompt that fills max_length, else keep the first max_length tokens
            if len(prompt_ids) >= max_length:
                return None
            room = max_length - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if not chosen_ids or not rejected_ids:
        return None
    out: dict[str, Any] = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if "margin" in example:
        out["margin"] = example["margin"]
    return out


class _ItemsDataset(Dataset):
    """A map-style dataset over a list of items (shared by the preference and SFT datasets)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class PreferenceDataset(_ItemsDataset):
    """Tokenised preference pairs (a list of :func:`encode_pair` dicts); an item also carries its ``index``."""

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


def _check_positive_ints(owner: str, values: dict[str, Any]) -> None:
    """Raise a ValueError naming ``owner`` and the argument for each value that is not a positive ``int``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: `{name}` must be a positive integer, got {value!r}.")


class _TokenizedSplits(L.LightningDataModule):
    """The glue :class:`PreferenceDataModule`, :class:`~lightning_llm.data.sft.SFTDataModule` and
    :class:`~lightning_llm.data.prompts.PromptDataModule` share: argument checks and saved hyperparameters, train / val
    rows read once (:meth:`_read_rows`), a tokenizer resolved on first use (:func:`resolve_tokenizer`), train / val
    datasets built once, and their loaders.

    The arguments all of them take are this class's (see :meth:`__init__`); a subclass declares only its own (and
    those whose default differs: ``dataset``, ``val_split``, ``num_train``, ``num_val``, ``batch_size``), forwards the
    rest with ``**kwargs``, checks its positive integers with :meth:`_check_positive`, and defines ``is_synthetic``,
    :meth:`_tokenizer_texts`, :meth:`_build_dataset` and ``_collate_items`` (or overrides :attr:`collate_fn`).
    """

    #: ``collate(items, pad_id)`` of the subclass's batches, a module-level function so :attr:`collate_fn` pickles
    _collate_items: Callable[..., Any]

    def __init__(
        self,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_dataset: str | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        chat_template: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """The arguments every subclass shares (a subclass forwards them with ``**kwargs``; the CLI still lists them).

        Args:
            dataset_config: the Hugging Face dataset configuration name, if any.
            train_split: the training split of a Hugging Face dataset.
            val_dataset: a separate local file (or dataset name) for validation, instead of a split.
            val_fraction: the fraction of the training examples held out for validation when ``val_split`` is
                ``None`` or the source is a single file (deterministic in ``seed``).
            tokenizer: ``None`` (the embedded task: a character tokenizer; other data: a byte-level BPE trained on
                the training texts), ``"char"``, a saved tokenizer directory, or a Hugging Face tokenizer path / name.
            tokenizer_vocab_size: BPE vocabulary size when a BPE is trained.
            chat_template: Jinja template for conversational data; ``None``: the Hugging Face tokenizer's own
                template, else :class:`ChatTemplate`'s default.
            num_workers: DataLoader worker processes.
            seed: the seed of the validation split and of the shuffling.

        The calling subclass's ``__init__`` arguments are saved as hyperparameters too (Lightning's
        ``save_hyperparameters`` collects the arguments of every ``__init__`` frame up the class chain).
        """
        super().__init__()
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ValueError(f"{type(self).__name__}: `val_fraction` must be in [0, 1), got {val_fraction!r}.")
        _check_positive_ints(type(self).__name__, {"tokenizer_vocab_size": tokenizer_vocab_size})
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"{type(self).__name__}: `num_workers` must be an integer >= 0, got {num_workers!r}.")
        self.save_hyperparameters()
        self._tokenizer: Tokenizer | None = None
        self._template: ChatTemplate | None = None
        self._datasets: dict[str, Dataset] = {}

    def _check_positive(self, **values: int | None) -> None:
        """Each value must be a positive ``int``; ``None`` means off and is not checked."""
        _check_positive_ints(type(self).__name__, {k: v for k, v in values.items() if v is not None})

    @property
    def is_synthetic(self) -> bool:
        raise NotImplementedError

    def _tokenizer_texts(self) -> list[str]:
        """The texts a tokenizer is built from (when one is trained)."""
        raise NotImplementedError

    def _build_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _drop_last(self, split: str, shuffle: bool) -> bool:
        return False

    def _read_rows(self, synthetic: Callable[[int, int], list[Any]], val_seed: int = 1) -> dict[str, list[Any]]:
        """Train / val rows: the embedded task's ``synthetic(n, seed)`` (val seeded ``seed + val_seed``), else
        :func:`load_records` of ``dataset``, validation from ``val_dataset`` (where the subclass has it), the
        ``val_split`` of a hub dataset, or ``val_fraction`` of the training rows (deterministic in ``seed``)."""
        hp = self.hparams
        if self.is_synthetic:
            rows = {"train": synthetic(hp.num_train, hp.seed), "val": synthetic(hp.num_val, hp.seed + val_seed)}
        else:
            train = load_records(hp.dataset, hp.train_split, hp.dataset_config)
            if hp.get("val_dataset") is not None:
                val = load_records(hp.val_dataset, hp.val_split or "train", hp.dataset_config)
            elif hp.val_split is not None and not _looks_like_file(hp.dataset):
                val = load_records(hp.dataset, hp.val_split, hp.dataset_config)
            else:
                train, val = _split(train, hp.val_fraction, hp.seed)
            rows = {"train": train, "val": val}
        if not rows["train"]:
            raise ValueError(f"{type(self).__name__}: dataset {hp.dataset!r} has no training examples.")
        return rows

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            spec = self.hparams.tokenizer
            # only a tokenizer built from the data reads the texts (a pretrained one renders chats with its template)
            texts = self._tokenizer_texts() if spec in (None, "char") and not self.is_synthetic else []
            self._tokenizer = resolve_tokenizer(spec, texts, self.is_synthetic, self.hparams.tokenizer_vocab_size)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def template(self) -> ChatTemplate:
        """The chat template of conversational data (resolved on first use, see :func:`resolve_chat_template`)."""
        if self._template is None:
            spec = self.hparams.tokenizer
            known = spec if isinstance(spec, Tokenizer) else (self.tokenizer if spec not in (None, "char") else None)
            self._template = resolve_chat_template(self.hparams.chat_template, spec, known)
        return self._template

    @property
    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """The loaders' ``collate_fn``: ``_collate_items`` bound to the tokenizer's ``pad_id`` (picklable)."""
        return partial(type(self)._collate_items, pad_id=self.tokenizer.pad_id)

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
        """A :class:`~lightning_llm.checkpoint.ResumableDataLoader` shuffled by a generator seeded with ``seed``, so a
        resumed run (RewardModel, DPO, SFT, PPO, GRPO) sees exactly the batches the uninterrupted one would."""
        from lightning_llm.checkpoint import ResumableDataLoader

        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return ResumableDataLoader(
            self.dataset(split),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate_fn,
            drop_last=self._drop_last(split, shuffle),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


class PreferenceDataModule(_TokenizedSplits):
    """Preference pairs for :class:`~lightning_llm.modules.RewardModel` and :class:`~lightning_llm.modules.DPO`.

    Args:
        dataset: ``"synthetic"`` (embedded letters task), a local ``.jsonl`` / ``.json`` / ``.parquet`` path, or a
            Hugging Face dataset name (``datasets.load_dataset``).
        val_split: the validation split of a Hugging Face dataset. When ``None`` (or the source is a single file),
            ``val_fraction`` of the training examples is held out (deterministic in ``seed``).
        max_length: token limit of prompt + completion (TRL's default 1024; ``None``: no limit), applied as
            ``truncation_mode`` says.
        max_prompt_length: optional limit of the prompt, which keeps its last tokens (TRL 0.x; ``None``: off, as
            TRL 1.x).
        truncation_mode: ``"keep_start"`` (``DPOTrainer``: drop pairs whose prompt fills ``max_length``, cut the rest
            to ``max_length``) or ``"filter"`` (``RewardTrainer``: drop pairs longer than ``max_length``).
        num_train, num_val: synthetic task sizes. synthetic_length, synthetic_min_gap: synthetic completion length and
            smallest score gap between chosen and rejected.
        batch_size: pairs per batch (per process).
        **kwargs: the shared arguments of ``_TokenizedSplits`` (``dataset_config``, ``train_split``, ``val_dataset``,
            ``val_fraction``, ``tokenizer`` -- ``None``: characters for ``"synthetic"``, else a BPE trained on the
            texts --, ``tokenizer_vocab_size``, ``chat_template``, ``num_workers``, ``seed``).
    """

    _collate_items = staticmethod(collate_preference)

    def __init__(
        self,
        dataset: str = "synthetic",
        val_split: str | None = "test",
        max_length: int | None = 1024,
        max_prompt_length: int | None = None,
        truncation_mode: str = "keep_start",
        num_train: int = 2048,
        num_val: int = 256,
        synthetic_length: int = 8,
        synthetic_min_gap: int = 2,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
        self._check_positive(**limits, batch_size=batch_size, num_train=num_train, num_val=num_val)
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(
                f"PreferenceDataModule: `max_prompt_length` ({max_prompt_length}) must be < `max_length` "
                f"({max_length}) to leave room for the completion."
            )
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"PreferenceDataModule: `truncation_mode` must be one of {list(TRUNCATION_MODES)} (DPOTrainer's, "
                f"RewardTrainer's), got {truncation_mode!r}."
            )
        self._texts: dict[str, list[dict[str, Any]]] | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.hparams.dataset == "synthetic"

    def text_examples(self) -> dict[str, list[dict[str, Any]]]:
        """The train / val examples as text (prompt, chosen, rejected[, margin]), loaded once."""
        if self._texts is None:
            hp = self.hparams
            raw = self._read_rows(
                lambda n, seed: synthetic_preference_examples(n, seed, hp.synthetic_length, hp.synthetic_min_gap)
            )
            template = _LazyTemplate(self)
            self._texts = {split: [to_text_example(ex, template) for ex in rows] for split, rows in raw.items()}
        return self._texts

    def _tokenizer_texts(self) -> list[str]:
        return [t for ex in self.text_examples()["train"] for t in (ex["prompt"], ex["chosen"], ex["rejected"])]

    def _build_dataset(self, split: str) -> PreferenceDataset:
        hp = self.hparams
        items = [
            encode_pair(ex, self.tokenizer, hp.max_length, hp.max_prompt_length, hp.truncation_mode)
            for ex in self.text_examples()[split]
        ]
        kept = [it for it in items if it is not None]
        if len(kept) < len(items):
            log.warning(
                "PreferenceDataModule: dropped %d %s pairs by the length rules (max_length, truncation_mode).",
                len(items) - len(kept),
                split,
            )
        return PreferenceDataset(kept)
