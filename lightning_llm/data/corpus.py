"""The embedded default corpus: real English text that ships with every Python installation.

No network, no download, no file outside the interpreter: the corpus is the text of the Python
reference topics (``pydoc_data.topics.topics``, the pages ``help("assert")`` shows) plus the
docstrings of a fixed, sorted list of pure-Python standard-library modules (module, class, method
and function docstrings). On two machines with the same Python version the corpus is byte-for-byte
identical, because the module list, the member order and the cleaning are all fixed.

Notation:
    doc     one document: a reference-topic section or one docstring group (a module docstring, a
            function docstring, or a class docstring followed by its methods' docstrings).
    h(doc)  the first 8 bytes of sha256(doc) read as an integer, scaled to [0, 1): the split key.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
import unicodedata
import warnings

__all__ = [
    "EMBEDDED_CORPUS_VERSION",
    "STDLIB_MODULES",
    "embedded_corpus",
    "embedded_documents",
    "embedded_split_documents",
    "embedded_splits",
    "split_documents",
]

#: Bumped whenever the cleaning or the module list changes (it is part of every cache key).
EMBEDDED_CORPUS_VERSION = 1

#: Pure-Python, cross-platform standard-library modules whose docstrings join the corpus. Sorted and
#: fixed so that the corpus is deterministic; a module that fails to import is skipped.
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "abc",
            "argparse",
            "ast",
            "asyncio.events",
            "asyncio.futures",
            "asyncio.locks",
            "asyncio.queues",
            "asyncio.streams",
            "asyncio.tasks",
            "base64",
            "bdb",
            "bisect",
            "calendar",
            "cmd",
            "codecs",
            "collections",
            "concurrent.futures._base",
            "configparser",
            "contextlib",
            "copy",
            "csv",
            "dataclasses",
            "datetime",
            "decimal",
            "difflib",
            "email.message",
            "email.utils",
            "enum",
            "filecmp",
            "fileinput",
            "fnmatch",
            "fractions",
            "ftplib",
            "functools",
            "getopt",
            "gettext",
            "glob",
            "gzip",
            "heapq",
            "hmac",
            "html",
            "html.parser",
            "http.client",
            "http.cookiejar",
            "http.server",
            "imaplib",
            "inspect",
            "io",
            "ipaddress",
            "json",
            "json.decoder",
            "json.encoder",
            "keyword",
            "linecache",
            "locale",
            "logging",
            "logging.handlers",
            "mailbox",
            "mimetypes",
            "numbers",
            "operator",
            "optparse",
            "pathlib",
            "pdb",
            "pickle",
            "pickletools",
            "pkgutil",
            "platform",
            "plistlib",
            "poplib",
            "pprint",
            "profile",
            "pstats",
            "queue",
            "quopri",
            "random",
            "re",
            "reprlib",
            "sched",
            "secrets",
            "selectors",
            "shelve",
            "shlex",
            "shutil",
            "smtplib",
            "socketserver",
            "statistics",
            "string",
            "struct",
            "subprocess",
            "symtable",
            "tabnanny",
            "tarfile",
            "tempfile",
            "textwrap",
            "threading",
            "timeit",
            "tokenize",
            "trace",
            "traceback",
            "tracemalloc",
            "types",
            "typing",
            "unittest.case",
            "unittest.mock",
            "urllib.parse",
            "urllib.request",
            "uuid",
            "warnings",
            "wave",
            "weakref",
            "webbrowser",
            "xml.dom.minidom",
            "xml.etree.ElementTree",
            "zipapp",
            "zipfile",
        ]
    )
)

# A document shorter than this (after cleaning) is near-empty ("Return self.", "Same as a+b.") and dropped.
_MIN_DOC_CHARS = 80
# Documents longer than this are cut at paragraph boundaries so that the split works on pieces of
# similar size (a few reference topics are 30 KB or more).
_MAX_DOC_CHARS = 4000
_BLANK_RUNS = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    """Normalises a document: NFC unicode, ``\\n`` newlines, tabs expanded, no trailing spaces, at
    most one blank line in a row, no leading or trailing blank lines. Indentation inside lines is kept
    (it carries the structure of code examples and grammar rules)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n").rstrip()


def _chunk(text: str, max_chars: int = _MAX_DOC_CHARS) -> list[str]:
    """Cuts ``text`` at blank lines into pieces of at most about ``max_chars`` characters (a single
    paragraph longer than that stays whole)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) + 2 > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def _topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        docs.append(topics[name])
    return docs


def _module_documents(module_name: str) -> list[str]:
    """Docstring groups of one module, in a fixed order: the module docstring, then every public
    class (its docstring followed by its own public methods' docstrings) and function defined in the
    module, sorted by name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any import failure means "not on this platform": skip it
        return []
    docs = [inspect.cleandoc(module.__doc__)] if isinstance(module.__doc__, str) else []
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            parts = [inspect.cleandoc(obj.__doc__)] if isinstance(obj.__doc__, str) else []
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_") and attr != "__init__":
                    continue
                func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                if isinstance(func, property):
                    func = func.fget
                # Only functions written in this module: other libraries monkeypatch stdlib classes
                # (e.g. transformers adds methods to logging.Logger) and must not change the corpus.
                if inspect.isfunction(func) and func.__module__ == module.__name__ and isinstance(func.__doc__, str):
                    parts.append(inspect.cleandoc(func.__doc__))
            docs.append("\n\n".join(parts))
        elif inspect.isfunction(obj) and isinstance(obj.__doc__, str):
            docs.append(inspect.cleandoc(obj.__doc__))
    return docs


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    docs = _topic_documents()
    for module_name in STDLIB_MODULES:
        docs.extend(_module_documents(module_name))
    seen: set[str] = set()
    out: list[str] = []
    for doc in (piece for raw in docs for piece in _chunk(_clean(raw))):
        if len(doc) >= _MIN_DOC_CHARS and doc not in seen:  # drop near-empty and duplicated docs
            seen.add(doc)
            out.append(doc)
    return tuple(out)


def embedded_documents() -> list[str]:
    """Returns the embedded corpus as a list of cleaned documents, in a fixed order.

    Returns:
        About 1,500+ documents (reference-topic sections and docstring groups), each at least 80
        characters long, no two equal.
    """
    return list(_documents())


def embedded_corpus() -> str:
    """Returns the whole embedded corpus as one string (documents separated by a blank line).

    The text is the Python reference topics (``pydoc_data.topics``) and the docstrings of the modules in
    :data:`STDLIB_MODULES`: real English prose about programming, at least 400 KB, identical on every
    machine with the same Python version.

    Example:
        >>> len(embedded_corpus().encode()) > 400_000
        True
    """
    return "\n\n".join(_documents())


def _unit_hash(doc: str) -> float:
    """h(doc) in [0, 1): the first 8 bytes of sha256(doc), as a fraction of 2^64."""
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}. Use e.g. 0.05.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction + test_fraction` must be < 1 so that a train split remains, got "
            f"{val_fraction} + {test_fraction}. Lower one of them."
        )


def split_documents(docs: list[str], val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, list[str]]:
    """Splits documents into train/val/test by a hash of each document's text (not by position or a
    random draw): ``h(doc) < val_fraction`` goes to val, ``< val_fraction + test_fraction`` to test, the
    rest to train. The assignment of a document never depends on the other documents, so identical
    documents always land in the same split and adding documents never moves existing ones. Order
    within a split follows ``docs``.

    Args:
        docs: The documents.
        val_fraction: Expected fraction of documents in the validation split, in [0, 1).
        test_fraction: Expected fraction of documents in the test split, in [0, 1).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    _check_fractions(val_fraction, test_fraction)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for doc in docs:
        h = _unit_hash(doc)
        out["val" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"].append(doc)
    return out


def embedded_split_documents(val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, list[str]]:
    """The embedded corpus's documents split by :func:`split_documents`.

    Args:
        val_fraction: Expected fraction of documents in the validation split.
        test_fraction: Expected fraction of documents in the test split.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` lists of documents.
    """
    return split_documents(embedded_documents(), val_fraction, test_fraction)


def embedded_splits(val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, str]:
    """The embedded corpus split deterministically into train/val/test text by document hash.

    Args:
        val_fraction: Expected fraction of documents in the validation split.
        test_fraction: Expected fraction of documents in the test split.

    Returns:
        ``{"train": str, "val": str, "test": str}``, each the split's documents joined by a blank line.

    Example:
        >>> splits = embedded_splits()
        >>> sorted(splits), len(splits["train"]) > len(splits["val"]) > 0
        (['test', 'train', 'val'], True)
    """
    return {k: "\n\n".join(v) for k, v in embedded_split_documents(val_fraction, test_fraction).items()}
