"""A small tokenizer wrapper around Hugging Face ``tokenizers``: train, save, load, fingerprint.

One class, :class:`Tokenizer`, covers the two tokenizers the project uses:

* a byte-level BPE trained here on the training split (GPT-2's scheme: bytes mapped to printable
  characters, no unknown token, ``<|endoftext|>`` as the only special token, used as eos and pad);
* any Hugging Face tokenizer, by local path or hub name, loaded through ``transformers.AutoTokenizer``
  (the real loading path) or, without ``transformers``, a directory holding a ``tokenizer.json``.

Text is always encoded WITHOUT the tokenizer's own special tokens (no BOS/EOS added by a post-processor),
as lm-evaluation-harness encodes text for causal LMs; callers add BOS/EOS explicitly.

Notation:
    V    vocabulary size, special and added tokens included (every id is in [0, V)).
    eos  end-of-text id, also the document separator in packed token streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lightning_llm.data._cache import atomic_write_text, hash_texts, resolve_cache_dir

__all__ = ["EOS_TOKEN", "SPECIAL_IDS_FILE", "Tokenizer", "load_tokenizer", "tokenizer_from_state", "tokenizer_state"]

#: The special token of the trained byte-level BPE (end of text, also used for padding), as in GPT-2.
EOS_TOKEN = "<|endoftext|>"
#: The file, beside ``tokenizer.json``, that records the special ids of a saved :class:`Tokenizer`.
SPECIAL_IDS_FILE = "lightning_llm_tokenizer.json"
_FORMAT_VERSION = 1
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


def _token_content(value: Any) -> str | None:
    """A special token from a ``tokenizer_config.json`` / ``special_tokens_map.json`` entry (a string or
    an ``AddedToken`` dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the special ids a causal LM needs.

    Args:
        tokenizer: The Hugging Face ``tokenizers.Tokenizer`` (fast tokenizer backend). Its truncation and
            padding are switched off: a data pipeline decides lengths, not the tokenizer.
        eos_id: End-of-text id (document separator in packed streams).
        bos_id: Beginning-of-sequence id, or ``None`` when the tokenizer has none (GPT-2, our BPE).
        pad_id: Padding id; defaults to ``eos_id``.
        name: Where the tokenizer came from (for ``repr`` and error messages).

    Attributes:
        source: the local directory :meth:`from_pretrained` or :meth:`load` read it from, else ``None``; files
            beside the tokenizer (a chat template in ``tokenizer_config.json``) are looked up there.

    Example:
        >>> tok = Tokenizer.train_bpe(["hello world, hello tokens"] * 20, vocab_size=300)
        >>> tok.decode(tok.encode("hello world"))
        'hello world'
        >>> tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
        True
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(
                f"`tokenizer` must be a `tokenizers.Tokenizer`, got {type(tokenizer).__name__}. "
                "Use `Tokenizer.from_pretrained(path_or_name)` for a Hugging Face tokenizer."
            )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.name = name
        self.source: str | None = None
        v = self.vocab_size
        pad_id = eos_id if pad_id is None else pad_id
        for arg, value in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)):
            if value is None and arg == "bos_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < v:
                raise ValueError(f"`{arg}` must be a token id in [0, {v}), got {value!r}.")
        self._eos_id, self._bos_id, self._pad_id = int(eos_id), (None if bos_id is None else int(bos_id)), int(pad_id)
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """V: the number of ids, added and special tokens included (every id is in ``[0, V)``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """End-of-text id."""
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None``."""
        return self._bos_id

    @property
    def pad_id(self) -> int:
        """Padding id (the eos id unless the tokenizer defines its own pad token)."""
        return self._pad_id

    @property
    def fingerprint(self) -> str:
        """A stable sha256 hex digest of the tokenizer JSON and the special ids, for cache keys."""
        if self._fingerprint is None:
            payload = self._tok.to_str() + json.dumps([self._eos_id, self._bos_id, self._pad_id])
            self._fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id}, pad_id={self.pad_id})"
        )

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, or ``None`` if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of ``token_id``, or ``None``."""
        return self._tok.id_to_token(int(token_id))

    # ------------------------------------------------------------------ encode / decode
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self._bos_id is None:
                raise ValueError(
                    f"`add_bos=True` but this tokenizer ({self.name}) has no BOS token. Use `add_bos=False` "
                    "(GPT-2-style tokenizers start documents after an eos instead)."
                )
            ids = [self._bos_id, *ids]
        if add_eos:
            ids = [*ids, self._eos_id]
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes one string without the tokenizer's own special tokens.

        Args:
            text: The text.
            add_bos: Prepend ``bos_id`` (an error if the tokenizer has none).
            add_eos: Append ``eos_id``.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}. Use `encode_batch` for a list.")
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encodes many strings at once (in parallel in the Rust backend), without special tokens.

        Args:
            texts: The texts.
            add_bos: Prepend ``bos_id`` to each.
            add_eos: Append ``eos_id`` to each.

        Returns:
            One list of ids per text.
        """
        if isinstance(texts, str):
            raise TypeError("`texts` must be a sequence of strings, got a single str. Use `encode(text)`.")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"`texts[{i}]` must be a str, got {type(text).__name__}.")
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = True) -> str:
        """Decodes ids (a list or a 1-D tensor) to text.

        Args:
            ids: Token ids.
            skip_special_tokens: Drop special tokens (eos, bos, pad) from the text.

        Returns:
            The text.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ serialisation
    @property
    def special_ids(self) -> dict[str, int | None]:
        """``{"eos_id", "bos_id", "pad_id"}``: with :meth:`to_str`, everything :meth:`from_str` needs."""
        return {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id}

    def to_str(self) -> str:
        """The ``tokenizers`` JSON of the backend (readable by ``tokenizers.Tokenizer.from_str``); store
        :attr:`special_ids` beside it (e.g. in a checkpoint) to restore the exact special ids."""
        return self._tok.to_str()

    @classmethod
    def from_str(
        cls, json_str: str, eos_id: int | None = None, bos_id: int | None = None, pad_id: int | None = None
    ) -> Tokenizer:
        """Rebuilds a tokenizer from :meth:`to_str` output (e.g. stored in a checkpoint).

        Args:
            json_str: The ``tokenizers`` JSON.
            eos_id: End-of-text id; when ``None`` it is looked up among the usual eos tokens
                (``<|endoftext|>``, ``</s>``, ...).
            bos_id: Beginning-of-sequence id, if any.
            pad_id: Padding id (default: ``eos_id``).

        Returns:
            The tokenizer.
        """
        if not isinstance(json_str, str):
            raise TypeError(f"`json_str` must be the tokenizer JSON string, got {type(json_str).__name__}.")
        tok = tokenizers.Tokenizer.from_str(json_str)
        if eos_id is None:
            eos_id = cls._find_eos(tok, "from_str")
        return cls(tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``tokenizer.json``, ``lightning_llm_tokenizer.json`` (the special ids) and a
        ``tokenizer_config.json`` that lets ``transformers.AutoTokenizer`` load the directory too.

        Args:
            directory: Created if missing; existing files of these names are replaced atomically.

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self._tok.to_str())
        tokens = {
            key: (None if tid is None else self.id_to_token(tid))
            for key, tid in (("eos_token", self.eos_id), ("bos_token", self.bos_id), ("pad_token", self.pad_id))
        }
        special = {
            "format_version": _FORMAT_VERSION,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "name": self.name,
            **tokens,
        }
        atomic_write_text(directory / SPECIAL_IDS_FILE, json.dumps(special, indent=2))
        hf_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            **{k: v for k, v in tokens.items() if v is not None},
        }
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(hf_config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Loads a directory written by :meth:`save`.

        Args:
            directory: The directory.

        Returns:
            The tokenizer, with the same ids and fingerprint as the one saved.
        """
        directory = Path(directory)
        missing = [f for f in ("tokenizer.json", SPECIAL_IDS_FILE) if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"`directory` {str(directory)!r} is not a saved lightning_llm tokenizer: missing {missing}. "
                "Save one with `Tokenizer.save(directory)`, or use `Tokenizer.from_pretrained` for a Hugging Face "
                "tokenizer directory."
            )
        special = json.loads((directory / SPECIAL_IDS_FILE).read_text(encoding="utf-8"))
        tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        loaded = cls(tok, special["eos_id"], special.get("bos_id"), special.get("pad_id"), name=special.get("name"))
        loaded.source = str(directory)
        return loaded

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike) -> Tokenizer:
        """Loads a Hugging Face tokenizer (local directory or hub name) or a directory saved by :meth:`save`.

        Order: a directory written by :meth:`save` is loaded directly; otherwise
        ``transformers.AutoTokenizer.from_pretrained`` is used when ``transformers`` is installed (the real
        loading path, hub names included), and its fast backend is wrapped; without ``transformers``, a
        directory (or file) with ``tokenizer.json`` is read by ``tokenizers`` and the special tokens come from
        ``tokenizer_config.json`` / ``special_tokens_map.json``.

        Args:
            path_or_name: A local directory, a ``tokenizer.json`` file, or a hub name such as ``"gpt2"``.

        Returns:
            The tokenizer. ``pad_id`` falls back to ``eos_id`` when the tokenizer has no pad token.
        """
        if not isinstance(path_or_name, (str, os.PathLike)) or not str(path_or_name):
            raise TypeError(f"`path_or_name` must be a non-empty path or hub name, got {path_or_name!r}.")
        path = Path(path_or_name).expanduser()
        if not path.exists() and (
            isinstance(path_or_name, os.PathLike) or str(path_or_name).startswith(_PATH_PREFIXES)
        ):
            raise FileNotFoundError(
                f"`tokenizer`={str(path_or_name)!r} looks like a local path but does not exist. Pass an existing "
                "directory (saved by `Tokenizer.save` or `save_pretrained`) or a Hugging Face hub name."
            )
        loaded = cls._read(path, path_or_name)
        if path.exists():
            loaded.source = str(path if path.is_dir() else path.parent)
        return loaded

    @classmethod
    def _read(cls, path: Path, path_or_name: str | os.PathLike) -> Tokenizer:
        """:meth:`from_pretrained`'s choice of reader (see its docstring for the order)."""
        if path.is_dir() and (path / SPECIAL_IDS_FILE).is_file():
            return cls.load(path)
        if path.is_file() and path.name == "tokenizer.json":
            return cls._from_tokenizer_json(path.parent, path)
        try:
            import transformers  # noqa: F401  (optional dependency, imported only here)
        except ImportError:
            if path.is_dir() and (path / "tokenizer.json").is_file():
                return cls._from_tokenizer_json(path, path / "tokenizer.json")
            raise ImportError(
                f"Loading the tokenizer {str(path_or_name)!r} needs `transformers` (it is neither a directory with "
                "tokenizer.json nor one saved by `Tokenizer.save`). Install it with `pip install lightning-llm[hf]`."
            ) from None
        return cls._from_transformers(str(path) if path.exists() else str(path_or_name))

    @classmethod
    def _from_transformers(cls, path_or_name: str) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path_or_name)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument and the fix
            raise ValueError(
                f"`tokenizer`={path_or_name!r} could not be loaded by `transformers.AutoTokenizer`: {err}. Pass an "
                "existing local directory, a directory saved by `Tokenizer.save`, or a hub name (needs network)."
            ) from err
        backend = getattr(hf, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(
                f"The tokenizer {path_or_name!r} ({type(hf).__name__}) has no fast `tokenizers` backend; lightning_llm "
                "needs a fast tokenizer. Convert it (e.g. save it with a tokenizer.json) and load that directory."
            )
        backend = tokenizers.Tokenizer.from_str(backend.to_str())  # a private copy: we switch truncation off
        eos_id = hf.eos_token_id
        if eos_id is None:
            eos_id = cls._find_eos(backend, path_or_name)
        return cls(backend, eos_id=eos_id, bos_id=hf.bos_token_id, pad_id=hf.pad_token_id, name=path_or_name)

    @classmethod
    def _from_tokenizer_json(cls, directory: Path, file: Path) -> Tokenizer:
        tok = tokenizers.Tokenizer.from_file(str(file))
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            if (directory / name).is_file():
                config.update(json.loads((directory / name).read_text(encoding="utf-8")))

        def lookup(key: str) -> int | None:
            content = _token_content(config.get(key))
            return None if content is None else tok.token_to_id(content)

        eos_id = lookup("eos_token")
        if eos_id is None:
            eos_id = cls._find_eos(tok, str(directory))
        return cls(tok, eos_id=eos_id, bos_id=lookup("bos_token"), pad_id=lookup("pad_token"), name=str(directory))

    @staticmethod
    def _find_eos(tok: tokenizers.Tokenizer, name: str) -> int:
        for candidate in _EOS_CANDIDATES:
            token_id = tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"The tokenizer {name!r} defines no eos token and none of {list(_EOS_CANDIDATES)} is in its vocabulary. "
            "Set `eos_token` in its tokenizer_config.json."
        )

    # ------------------------------------------------------------------ training
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Trains a GPT-2-style byte-level BPE with ``<|endoftext|>`` (id 0) as eos and pad.

        Args:
            texts: Training texts (documents).
            vocab_size: Target vocabulary size, special token included; at least 257 (256 bytes + eos).
                The result can be smaller when the texts support fewer merges.
            min_frequency: A pair must occur at least this often to be merged.

        Returns:
            The trained tokenizer (deterministic for the same texts and arguments).
        """
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 257:
            raise ValueError(
                f"`vocab_size` must be an int >= 257 (256 byte tokens + {EOS_TOKEN}) for a byte-level BPE, "
                f"got {vocab_size!r}."
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"`min_frequency` must be an int >= 1, got {min_frequency!r}.")
        if isinstance(texts, str):
            raise TypeError("`texts` must be an iterable of strings (documents), got a single str. Wrap it: [text].")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        count = 0

        def counted() -> Iterable[str]:
            nonlocal count
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"`texts` must contain strings, got {type(text).__name__}.")
                count += len(text)
                yield text

        tok.train_from_iterator(counted(), trainer)
        if count == 0:
            raise ValueError("`texts` is empty (no characters to train the BPE on). Pass a non-empty training split.")
        return cls(tok, eos_id=tok.token_to_id(EOS_TOKEN), name=f"byte-level-bpe-{vocab_size}")


def load_tokenizer(
    spec: str | os.PathLike | Tokenizer | None,
    train_texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Resolves a tokenizer specification.

    Args:
        spec: A :class:`Tokenizer` (returned as is); a path or hub name (:meth:`Tokenizer.from_pretrained`); or
            ``None``: train a byte-level BPE on ``train_texts``, cached on disk under
            ``<cache_dir>/tokenizers/bpe-<hash>`` keyed by a hash of (texts, vocab_size, min_frequency), so the
            same texts load the saved tokenizer instead of training again.
        train_texts: Training documents, needed when ``spec`` is ``None``.
        vocab_size: BPE vocabulary size (only when training).
        cache_dir: Cache root; default ``$LIGHTNING_LLM_CACHE`` or ``~/.cache/lightning_llm``.
        min_frequency: BPE minimum pair frequency (only when training).

    Returns:
        The tokenizer.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if spec is not None:
        if not isinstance(spec, (str, os.PathLike)):
            raise TypeError(f"`tokenizer` must be None, a path/hub name or a Tokenizer, got {type(spec).__name__}.")
        return Tokenizer.from_pretrained(spec)
    if train_texts is None:
        raise ValueError("`tokenizer=None` means 'train a BPE on the training texts', but `train_texts` is None.")
    texts = [train_texts] if isinstance(train_texts, str) else list(train_texts)
    key = hash_texts(texts, "bpe", _FORMAT_VERSION, vocab_size, min_frequency)[:20]
    directory = resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-{key}"
    if (directory / SPECIAL_IDS_FILE).is_file():
        try:
            return Tokenizer.load(directory)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt below
            shutil.rmtree(directory, ignore_errors=True)
    tok = Tokenizer.train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tok.save(tmp)
        try:
            os.replace(tmp, directory)  # atomic; fails if another process got there first
        except OSError:
            if not (directory / SPECIAL_IDS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def tokenizer_state(tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    """The checkpoint entries that carry a tokenizer: ``{"tokenizer_json": tokenizer.to_str(),
    "tokenizer_special_ids": tokenizer.special_ids}`` (plain strings and ints, safe under ``weights_only``);
    ``None`` without a tokenizer."""
    if tokenizer is None or not hasattr(tokenizer, "to_str"):
        return None
    return {"tokenizer_json": tokenizer.to_str(), "tokenizer_special_ids": dict(tokenizer.special_ids)}


def tokenizer_from_state(state: dict[str, Any] | None) -> Tokenizer | None:
    """Inverse of :func:`tokenizer_state`; ``state`` may be a whole checkpoint. ``None`` when none is stored.

    Also reads the first RLHF modules' entry ``checkpoint["tokenizer"] = {"json", "eos_id", "bos_id", "pad_id"}``.
    """
    if not state:
        return None
    if isinstance(state.get("tokenizer_json"), str):
        return Tokenizer.from_str(state["tokenizer_json"], **(state.get("tokenizer_special_ids") or {}))
    legacy = state.get("tokenizer", state)
    if not isinstance(legacy, dict) or "json" not in legacy:
        return None
    return Tokenizer.from_str(legacy["json"], eos_id=legacy["eos_id"], bos_id=legacy["bos_id"], pad_id=legacy["pad_id"])
