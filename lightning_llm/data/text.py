"""``TextDataModule``: documents -> tokenizer -> packed token stream -> fixed-size next-token blocks.

Sources: the embedded corpus (``"embedded"``, no network), a local ``.txt`` / ``.jsonl`` / ``.json`` file
or directory (read with ``datasets.load_dataset``, like any dataset), or a Hugging Face dataset name
(``datasets.load_dataset(name, config)``). A source with a single split is split by document hash.

Packing: the documents of a split are encoded and joined with ``eos`` between documents into one stream
``s`` of N tokens (cached on disk). Block ``i`` is ``s[i*T : i*T + T + 1]``: inputs are its first T
tokens, targets its last T (the shift is already applied), so consecutive blocks overlap by one token
and every token but the first is a target exactly once. Train drops the final partial block; val/test
keep it, padding inputs with ``pad_id`` and targets with ``-100`` (ignored), so evaluation scores every
token of the split.

Notation:
    B    batch size.
    T    block size (tokens per training example, ``block_size``).
    N    tokens in a split's stream.
    V    vocabulary size.
    c_v  count of token v among the training targets; C = sum_v c_v.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_llm.checkpoint import ResumableDataLoader, load_checkpoint
from lightning_llm.data._cache import atomic_torch_save, hash_json, hash_texts, resolve_cache_dir
from lightning_llm.data.corpus import (
    EMBEDDED_CORPUS_VERSION,
    _check_fractions,
    _unit_hash,
    embedded_split_documents,
    split_documents,
)
from lightning_llm.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackedBlockDataset",
    "TextDataModule",
    "diagnose_local_file",
    "load_documents",
    "load_local_file",
    "pack_documents",
]

log = logging.getLogger(__name__)

#: Target value that the loss and the metrics ignore (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
_STREAM_FORMAT_VERSION = 1
_LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json"}


class PackedBlockDataset(Dataset):
    """Fixed-size next-token blocks over a packed token stream.

    Args:
        tokens: The stream, shape ``(N,)``, any integer dtype.
        block_size: T.
        pad_id: Input id used to pad the final partial block.
        drop_last: Drop the final partial block (train) instead of padding it (val/test).
        max_blocks: Keep only the first ``max_blocks`` blocks.

    Each item is ``{"input_ids": (T,) long, "targets": (T,) long}`` with ``targets[t]`` the token after
    ``input_ids[t]``, or ``-100`` in padding.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        block_size: int,
        pad_id: int,
        drop_last: bool = True,
        max_blocks: int | None = None,
    ) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"`tokens` must be 1-D (N,), got shape {tuple(tokens.shape)}.")
        self.tokens = tokens
        self.block_size = block_size
        self.pad_id = pad_id
        n_targets = max(tokens.numel() - 1, 0)
        n_blocks = n_targets // block_size if drop_last else math.ceil(n_targets / block_size)
        self.n_blocks = n_blocks if max_blocks is None else min(n_blocks, max_blocks)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block index {index} out of range [0, {self.n_blocks})")
        start = index * self.block_size
        chunk = self.tokens[start : start + self.block_size + 1].long()  # (<= T+1,)
        input_ids = chunk[:-1]
        targets = chunk[1:]
        missing = self.block_size - input_ids.numel()
        if missing > 0:
            input_ids = torch.cat([input_ids, input_ids.new_full((missing,), self.pad_id)])
            targets = torch.cat([targets, targets.new_full((missing,), IGNORE_INDEX)])
        return {"input_ids": input_ids, "targets": targets}

    def targets(self) -> torch.Tensor:
        """All non-ignored targets of the dataset, in order: ``tokens[1 : 1 + scored]``, shape ``(n,)``."""
        n = min(self.n_blocks * self.block_size, max(self.tokens.numel() - 1, 0))
        return self.tokens[1 : 1 + n].long()


def pack_documents(token_lists: list[list[int]], eos_id: int) -> torch.Tensor:
    """Joins encoded documents with ``eos_id`` between them into one stream.

    Args:
        token_lists: One list of ids per document.
        eos_id: Separator id.

    Returns:
        The stream, shape ``(N,)``, int32 (int64 if an id needs it).
    """
    flat: list[int] = []
    for i, ids in enumerate(token_lists):
        if i:
            flat.append(eos_id)
        flat.extend(ids)
    out = torch.tensor(flat, dtype=torch.int64)  # (N,)
    if out.numel() == 0 or int(out.max()) < 2**31:
        out = out.to(torch.int32)
    return out


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in _LOCAL_SUFFIXES or name.startswith(("/", "./", "../", "~"))


def _column_texts(ds: Any, text_column: str, where: str, strip_newlines: bool, local: bool = False) -> list[str]:
    """The non-empty strings of ``ds[text_column]`` (``local``: a missing value is an error, not a skipped row)."""
    columns = list(getattr(ds, "column_names", []) or [])
    if text_column not in columns:
        raise ValueError(
            f"`text_column`={text_column!r} is not a column of {where}; its columns are {columns}. "
            "Set `text_column` to the column holding the text."
        )
    out: list[str] = []
    for row, value in enumerate(ds[text_column]):
        if not isinstance(value, str):
            if value is None:
                if local:
                    raise ValueError(
                        f"{where}: row {row} (0-based, blank lines not counted) has no {text_column!r} value (missing "
                        f"or null); every row of a local file needs a string under {text_column!r}. Fix or remove that "
                        "row, or set `text_column`."
                    )
                continue
            raise TypeError(
                f"`text_column`={text_column!r} of {where} must hold strings, found {type(value).__name__}. "
                "Choose a text column."
            )
        if strip_newlines:
            value = value.strip("\r\n")
        if value.strip():
            out.append(value)
    return out


def load_documents(
    dataset: str = "embedded",
    dataset_config: str | None = None,
    text_column: str = "text",
    train_split: str = "train",
    val_split: str = "validation",
    test_split: str = "test",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    hf_cache_dir: str | None = None,
) -> dict[str, list[str]]:
    """Loads a text source as documents per split (see :class:`TextDataModule` for the arguments).

    A source that lacks the val and/or test split gets them from its train split by document hash
    (:func:`lightning_llm.data.corpus.split_documents`); when that leaves a split empty (very few
    documents), the train documents are cut contiguously by character fractions instead.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` non-empty lists of documents.
    """
    if not isinstance(dataset, str) or not dataset:
        raise TypeError(f"`dataset` must be a non-empty string, got {dataset!r}.")
    if dataset == "embedded":
        docs = embedded_split_documents(val_fraction, test_fraction)
        return _check_nonempty(docs, dataset)

    import datasets  # imported lazily: the embedded corpus needs no `datasets`

    path = Path(dataset).expanduser()
    strip = False
    if path.is_file():
        builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"`dataset`={dataset!r}: unsupported file type {path.suffix!r}; expected one of "
                f"{sorted(_LOCAL_SUFFIXES)} (or a directory, or a Hugging Face dataset name)."
            )
        strip = builder == "text"
        kwargs: dict[str, Any] = {"sample_by": "paragraph"} if strip else {}
        loaded = load_local_file(path, dataset, cache_dir=hf_cache_dir, **kwargs)
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
            if not files:
                raise ValueError(f"`dataset`={dataset!r} is an empty directory. Put .txt or .jsonl files in it.")
            suffixes = {p.suffix.lower() for p in files}
            strip = suffixes <= {".txt", ".text"}
            kwargs = {"sample_by": "paragraph"} if strip else {}
            try:
                loaded = datasets.load_dataset(str(path), dataset_config, cache_dir=hf_cache_dir, **kwargs)
            except Exception as err:  # noqa: BLE001 - re-raised naming the file, the line and the fix
                for file in sorted(files):
                    if file.suffix.lower() in _LOCAL_SUFFIXES:
                        problem = diagnose_local_file(file)
                        if problem is not None:
                            raise ValueError(f"`dataset`={dataset!r}: {problem}") from None
                raise ValueError(
                    f"`dataset`={dataset!r}: datasets.load_dataset could not read the directory "
                    f"({_root_cause(err)}). Put .txt / .jsonl / .json files of one kind in it."
                ) from None
    elif _looks_like_path(dataset):
        raise FileNotFoundError(
            f"`dataset`={dataset!r} looks like a local path but does not exist. Check the path, or pass "
            "'embedded' or a Hugging Face dataset name."
        )
    else:
        try:
            loaded = datasets.load_dataset(dataset, dataset_config)
        except Exception as err:  # noqa: BLE001 - re-raised with the argument and the fix
            raise ValueError(
                f"`dataset`={dataset!r} (config {dataset_config!r}) could not be loaded with "
                f"`datasets.load_dataset`: {type(err).__name__}: {err}. Pass 'embedded', an existing local "
                ".txt/.jsonl file or directory, or a Hugging Face dataset name reachable from this machine."
            ) from err

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({train_split: loaded})
    available = list(loaded.keys())
    if train_split not in loaded:
        raise ValueError(
            f"`train_split`={train_split!r} is not a split of {dataset!r}; available splits: {available}. "
            "Set `train_split` (and `val_split`/`test_split`); local files give a single 'train' split."
        )
    train_name = train_split
    try:
        texts = {
            name: _column_texts(loaded[name], text_column, f"{dataset!r} split {name!r}", strip, local=path.exists())
            for name in {train_name, val_split, test_split}
            if name in loaded
        }
    except UnicodeDecodeError:  # pyarrow reads JSON strings without checking UTF-8, and fails only here
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in files:
            problem = diagnose_local_file(file) if file.suffix.lower() in _LOCAL_SUFFIXES else None
            if problem is not None:
                raise ValueError(f"`dataset`={dataset!r}: {problem}") from None
        raise
    train_docs = texts[train_name]
    has_val, has_test = val_split in texts and val_split != train_name, test_split in texts and test_split != train_name
    if has_val and has_test:
        docs = {"train": train_docs, "val": texts[val_split], "test": texts[test_split]}
    else:
        vf = 0.0 if has_val else val_fraction
        tf = 0.0 if has_test else test_fraction
        derived = _split_with_fallback(train_docs, vf, tf)
        docs = {
            "train": derived["train"],
            "val": texts[val_split] if has_val else derived["val"],
            "test": texts[test_split] if has_test else derived["test"],
        }
    return _check_nonempty(docs, dataset)


_EXPECTED = {
    "text": "UTF-8 text, documents separated by blank lines",
    "jsonl": 'UTF-8 JSON Lines: one object per line, such as {"text": "..."}',
    "json": 'UTF-8 JSON: a list of objects such as [{"text": "..."}], or JSON Lines',
}


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain as one line (``datasets`` wraps the real error in its own)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def diagnose_local_file(path: str | Path) -> str | None:
    """What is wrong with a local ``.txt`` / ``.jsonl`` / ``.json`` data file, as one sentence naming the file, the
    line (when there is one), what was expected and the fix; ``None`` when nothing is found.

    Checks, in order: the file is not empty, every line is UTF-8, it holds some text; a ``.jsonl`` file holds one JSON
    object per non-blank line; a ``.json`` file is one JSON document (a list of objects, or an object) or JSON Lines.
    """
    path = Path(path)
    kind = {".jsonl": "jsonl", ".json": "json"}.get(path.suffix.lower(), "text")
    expected = f"expected {_EXPECTED[kind]}"
    where = f"local data file {str(path)!r}"
    lines: list[str] = []
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                return (
                    f"{where} is not UTF-8: line {number} (byte {offset + err.start}) holds {raw[err.start : err.start + 4]!r} "
                    f"({err.reason}); {expected}. Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`."
                )
            offset += len(raw)
    if not any(line.strip() for line in lines):
        what = "is empty (0 bytes)" if offset == 0 else "holds only blank lines"
        return f"{where} {what}; {expected}. Put data in it or pass another file."
    if kind == "text":
        return None
    text = "".join(lines)
    if kind == "json":
        stripped = text.strip()
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError as err:
            first = next(line for line in lines if line.strip())
            try:  # a valid first line means JSON Lines, checked line by line below
                json.loads(first)
            except json.JSONDecodeError:
                return (
                    f"{where} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}; {expected}. Fix the "
                    "JSON syntax there."
                )
        else:
            if isinstance(document, list):
                for index, row in enumerate(document):
                    if not isinstance(row, dict):
                        return (
                            f"{where}: element {index} of the list is a {type(row).__name__}, not an object; "
                            f"{expected}."
                        )
                return None if document else f"{where} holds an empty list; {expected}. Put rows in it."
            if isinstance(document, dict):
                return None
            return f"{where} holds a JSON {type(document).__name__}; {expected}."
    for number, row in _json_lines(lines):
        if isinstance(row, json.JSONDecodeError):
            return (
                f"{where}: line {number} is not valid JSON (column {row.colno}: {row.msg}); {expected}. Fix or remove "
                "that line."
            )
        if not isinstance(row, dict):
            return f"{where}: line {number} holds a JSON {type(row).__name__}, not an object; {expected}."
    return None


def _json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of JSON Lines (numbers 1-based); a line that is not JSON
    gives its ``json.JSONDecodeError`` as the value, so each reader words the error itself (also LAMBADA's reader)."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, err


def load_local_file(path: str | Path, dataset: str | None = None, cache_dir: str | None = None, **kwargs: Any):
    """``datasets.load_dataset`` of one local ``.txt`` / ``.jsonl`` / ``.json`` file (``**kwargs`` go to it), with
    one clear ``ValueError`` naming the file, the line, what was expected and the fix instead of a
    ``DatasetGenerationError`` when the file is empty, not UTF-8 or malformed (see :func:`diagnose_local_file`).

    Returns:
        The ``DatasetDict`` (one ``"train"`` split) that ``load_dataset`` returns, or the ``Dataset`` when ``split`` is
        given in ``kwargs``.
    """
    import datasets

    path = Path(path)
    label = f"`dataset`={dataset if dataset is not None else str(path)!r}"
    builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{label}: unsupported file type {path.suffix!r}; expected one of {sorted(_LOCAL_SUFFIXES)}.")
    # a .json document is parsed strictly first: pyarrow's reader accepts some malformed files, keeping part of them
    problem = diagnose_local_file(path) if path.suffix.lower() == ".json" else None
    if problem is not None:
        raise ValueError(f"{label}: {problem}")
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised naming the file, the line and the fix
        problem = diagnose_local_file(path)  # read only on failure: the happy path costs nothing extra
        if problem is not None:
            raise ValueError(f"{label}: {problem}") from None
        kind = "text" if builder == "text" else path.suffix.lower().lstrip(".")
        raise ValueError(
            f"{label}: datasets.load_dataset({builder!r}) could not read {str(path)!r} ({_root_cause(err)}); "
            f"expected {_EXPECTED[kind]}."
        ) from None
    if not sum(len(split) for split in (loaded.values() if isinstance(loaded, dict) else [loaded])):
        problem = diagnose_local_file(path)  # e.g. only blank lines
        if problem is not None:
            raise ValueError(f"{label}: {problem}")
    return loaded


def _split_with_fallback(docs: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Hash split; a held-out split that comes out empty (few documents) receives the train documents with the
    highest hashes (``round(fraction * n)``, at least one); a source with a single document is cut by lines."""
    out = split_documents(docs, val_fraction, test_fraction)
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction <= 0 or out[split]:
            continue
        unique = sorted(set(out["train"]), key=_unit_hash, reverse=True)
        k = min(max(1, round(fraction * len(docs))), len(unique) - 1)
        if k >= 1:
            moved = set(unique[:k])
            out[split] = [d for d in out["train"] if d in moved]
            out["train"] = [d for d in out["train"] if d not in moved]
    if all(out[k] for k, f in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)) if f > 0) or not docs:
        return out
    # One (distinct) document: cut its lines contiguously by character fractions.
    lines = "\n".join(docs).split("\n")
    n = sum(len(line) + 1 for line in lines)
    bounds = (n * (1.0 - val_fraction - test_fraction), n * (1.0 - test_fraction))
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    pos = 0
    for line in lines:
        key = "train" if pos < bounds[0] else "val" if pos < bounds[1] else "test"
        parts[key].append(line)
        pos += len(line) + 1
    joined = {k: "\n".join(v).strip("\n") for k, v in parts.items()}
    return {k: [v] if v.strip() else [] for k, v in joined.items()}


def _check_nonempty(docs: dict[str, list[str]], dataset: str) -> dict[str, list[str]]:
    local = Path(dataset).expanduser()
    if not docs.get("train") and dataset != "embedded" and local.is_file():
        problem = diagnose_local_file(local)  # e.g. a file of blank lines: say so rather than "empty split"
        if problem is not None:
            raise ValueError(f"`dataset`={dataset!r}: {problem}")
    for split in SPLITS:
        if not docs.get(split):
            raise ValueError(
                f"`dataset`={dataset!r} gives an empty {split} split (no non-empty documents). Provide more text, "
                "check `text_column`, or adjust the split names/fractions."
            )
    return docs


class TextDataModule(L.LightningDataModule):
    """Causal-LM data: documents packed into next-token blocks, with a tokenizer trained or loaded on demand.

    Args:
        dataset: ``"embedded"`` (the corpus shipped with Python, no network), a local ``.txt`` (documents =
            paragraphs, i.e. blank-line separated) / ``.jsonl`` / ``.json`` file or a directory of them (splits
            inferred from file names such as ``train.txt``, ``validation.txt``), a directory written by
            ``Dataset.save_to_disk``, or a Hugging Face dataset name.
        dataset_config: The dataset's configuration name (``load_dataset(name, config)``).
        text_column: Column holding the text.
        train_split: Name of the training split in the source.
        val_split: Name of the validation split; when missing, it is taken from the train split by hash.
        test_split: Name of the test split; when missing, it is taken from the train split by hash.
        tokenizer: ``None`` trains a byte-level BPE of ``vocab_size`` on the train split (cached); otherwise a
            Hugging Face tokenizer path/name or a directory saved by ``Tokenizer.save``.
        vocab_size: BPE vocabulary size when training one. The ``vocab_size`` attribute of the module is the
            tokenizer's actual size (the CLI links it to the model config).
        block_size: T, tokens per example.
        batch_size: B.
        num_workers: DataLoader workers.
        cache_dir: Cache root for tokenizers and token streams; default ``$LIGHTNING_LLM_CACHE`` or
            ``~/.cache/lightning_llm``.
        seed: Seed of the training shuffle.
        max_train_blocks: Use only the first this-many training blocks.
        max_eval_blocks: Use only the first this-many val/test blocks.
        val_fraction: Fraction of documents held out for val when the source has no val split.
        test_fraction: Fraction of documents held out for test when the source has no test split.

    Example:
        >>> dm = TextDataModule("embedded", vocab_size=512, block_size=32, batch_size=4)  # doctest: +SKIP
        >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> batch["input_ids"].shape, batch["targets"].shape  # doctest: +SKIP
        (torch.Size([4, 32]), torch.Size([4, 32]))
    """

    def __init__(
        self,
        dataset: str = "embedded",
        dataset_config: str | None = None,
        text_column: str = "text",
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 42,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        _check_int("block_size", block_size, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, None)
        if max_train_blocks is not None:
            _check_int("max_train_blocks", max_train_blocks, 1)
        if max_eval_blocks is not None:
            _check_int("max_eval_blocks", max_eval_blocks, 1)
        if tokenizer is None:
            _check_int("vocab_size", vocab_size, 257, hint=" (a byte-level BPE needs 256 byte tokens + eos)")
        elif isinstance(tokenizer, Tokenizer):
            pass
        elif not isinstance(tokenizer, str) or not tokenizer:
            raise TypeError(f"`tokenizer` must be None or a path/hub name string, got {tokenizer!r}.")
        if not isinstance(text_column, str) or not text_column:
            raise TypeError(f"`text_column` must be a non-empty string, got {text_column!r}.")
        _check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters(ignore=["tokenizer"] if isinstance(tokenizer, Tokenizer) else None)
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.text_column = text_column
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.seed = seed
        self.max_train_blocks = max_train_blocks
        self.max_eval_blocks = max_eval_blocks
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._docs: dict[str, list[str]] | None = None
        self._tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self._streams: dict[str, torch.Tensor] = {}
        self._datasets: dict[str, PackedBlockDataset] = {}

    # ------------------------------------------------------------------ lazy pieces
    @property
    def documents(self) -> dict[str, list[str]]:
        """``{"train", "val", "test"}`` -> documents (loaded on first access)."""
        if self._docs is None:
            self._docs = load_documents(
                self.dataset,
                self.dataset_config,
                self.text_column,
                self.train_split,
                self.val_split,
                self.test_split,
                self.val_fraction,
                self.test_fraction,
                hf_cache_dir=str(self.cache_dir / "hf_datasets"),
            )
        return self._docs

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (trained on the train split or loaded on first access, then cached on disk)."""
        if self._tokenizer is None:
            train = self.documents["train"] if self.tokenizer_spec is None else None
            self._tokenizer = load_tokenizer(self.tokenizer_spec, train, self.bpe_vocab_size, self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size V (works right after ``__init__``; the CLI links it to the model)."""
        return self.tokenizer.vocab_size

    def stream_cache_path(self, split: str) -> Path:
        """Where the token stream of ``split`` is cached; the name hashes (documents, split, tokenizer)."""
        split = _check_split(split)
        key = hash_json(
            {
                "format": _STREAM_FORMAT_VERSION,
                "corpus_version": EMBEDDED_CORPUS_VERSION if self.dataset == "embedded" else None,
                "documents": hash_texts(self.documents[split]),
                "split": split,
                "tokenizer": self.tokenizer.fingerprint,
            }
        )
        return self.cache_dir / "streams" / f"{split}-{key[:24]}.pt"

    def token_stream(self, split: str) -> torch.Tensor:
        """The packed token stream of ``split``, shape ``(N,)`` int32, built once and cached on disk."""
        split = _check_split(split)
        if split not in self._streams:
            path = self.stream_cache_path(split)
            tokens = None
            if path.is_file():
                try:
                    tokens = load_checkpoint(path)["tokens"]  # weights_only: a planted cache file runs nothing
                except Exception:  # noqa: BLE001 - a corrupt (or hostile) cache file is rebuilt
                    log.warning("Rebuilding unreadable token cache %s", path)
            if tokens is None:
                tok = self.tokenizer
                tokens = pack_documents(tok.encode_batch(self.documents[split]), tok.eos_id)
                atomic_torch_save({"tokens": tokens, "split": split, "tokenizer": tok.fingerprint}, path)
            self._streams[split] = tokens
        return self._streams[split]

    def _dataset(self, split: str) -> PackedBlockDataset:
        split = _check_split(split)
        if split not in self._datasets:
            tokens = self.token_stream(split)
            train = split == "train"
            ds = PackedBlockDataset(
                tokens,
                self.block_size,
                self.tokenizer.pad_id,
                drop_last=train,
                max_blocks=self.max_train_blocks if train else self.max_eval_blocks,
            )
            if len(ds) == 0:
                raise ValueError(
                    f"`block_size`={self.block_size} is too large for the {split} split of {self.dataset!r}: it "
                    f"has {tokens.numel()} tokens, and a training block needs block_size + 1 = {self.block_size + 1}. "
                    "Lower `block_size` or add data."
                )
            self._datasets[split] = ds
        return self._datasets[split]

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Builds (or finds) the cached tokenizer and token streams; runs on one process per node."""
        for split in SPLITS:
            self.token_stream(split)

    def setup(self, stage: str | None = None) -> None:
        """Builds the block datasets the stage needs (from the on-disk caches when present)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}
        for split in needed.get(stage, SPLITS) if stage is not None else SPLITS:
            self._dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        # the training loader saves its position in checkpoints, so a run resumed mid-epoch continues exactly
        loader_cls = ResumableDataLoader if shuffle else DataLoader
        return loader_cls(
            self._dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled with a generator seeded by ``seed``."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in order (the last one padded, targets ``-100`` in padding)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test blocks in order (the last one padded, targets ``-100`` in padding)."""
        return self._loader("test", shuffle=False)

    # ------------------------------------------------------------------ baseline
    def unigram_perplexity(self, split: str = "val") -> float:
        """Perplexity of an add-one (Laplace) smoothed unigram model fitted on the training targets.

        ``p(v) = (c_v + 1) / (C + V)`` with ``c_v`` the count of token ``v`` among the targets of the
        training blocks (``max_train_blocks`` respected) and V the tokenizer's vocabulary size; the result is
        ``exp(-(1/n) * sum_i log p(y_i))`` over the n non-ignored targets ``y_i`` of ``split`` (exactly the
        targets its dataloader yields). A model that beats this has learnt more than token frequencies.

        Args:
            split: ``"val"`` (default), ``"test"`` or ``"train"``.

        Returns:
            The perplexity (natural-log based), a float >= 1.
        """
        counts = torch.bincount(self._dataset("train").targets(), minlength=self.vocab_size).double()  # (V,)
        log_p = torch.log(counts + 1.0) - math.log(counts.sum().item() + self.vocab_size)  # (V,)
        targets = self._dataset(split).targets()
        return math.exp(-log_p[targets].mean().item())


def _check_split(split: str) -> str:
    split = {"validation": "val", "valid": "val"}.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    return split


def _check_int(name: str, value: Any, minimum: int | None, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"`{name}` must be an int{bound}{hint}, got {value!r}.")
