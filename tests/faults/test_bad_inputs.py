"""Corrupted, truncated, empty, wrong-format and hostile inputs fed to every loader: one clear, specific error each.

Each row of the table builds one bad input in a fresh folder, calls one loader on it and expects an exception type and
a message pattern that names the problem. No row may have a side effect: the folder holds exactly the files the row
wrote, with the same bytes (nothing created, nothing modified, no marker file of a hostile payload).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lightning_llm.checkpoint import load_checkpoint

# --------------------------------------------------------------------------------------------------------- inputs


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _real_checkpoint_bytes() -> bytes:
    """A small checkpoint shaped like ours (tensors, numbers, strings, a config dict)."""
    import io

    buffer = io.BytesIO()
    state = {f"model.layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    torch.save({"state_dict": state, "global_step": 3, "transformer_config": {"vocab_size": 8, "n_layer": 1}}, buffer)
    return buffer.getvalue()


def _write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


CKPT_INPUTS: dict[str, Callable[[Path], Path]] = {
    "empty": lambda d: _write(d, "model.ckpt", b""),
    "truncated": lambda d: _write(d, "model.ckpt", _real_checkpoint_bytes()[:3000]),
    "bit-flipped": lambda d: _write(d, "model.ckpt", bytes(b ^ 0xFF for b in _real_checkpoint_bytes()[:2000])),
    "text": lambda d: _write(d, "model.ckpt", "this is not a checkpoint\n"),
    "json": lambda d: _write(d, "model.ckpt", json.dumps({"state_dict": {}})),
    "safetensors": lambda d: _write(d, "model.ckpt", (2).to_bytes(8, "little") + b"{}"),
    "tensor-not-dict": lambda d: (torch.save(torch.ones(2), d / "model.ckpt"), d / "model.ckpt")[1],
    "hostile": lambda d: (torch.save({"x": _Hostile(d / "PWNED")}, d / "model.ckpt"), d / "model.ckpt")[1],
}
CKPT_ERRORS = {
    "empty": (ValueError, r"model\.ckpt.* is empty \(0 bytes\)"),
    "truncated": (ValueError, r"model\.ckpt.* is truncated or corrupted"),
    "bit-flipped": (ValueError, r"model\.ckpt.* is not a PyTorch checkpoint"),
    "text": (ValueError, r"model\.ckpt.* is not a PyTorch checkpoint: it looks like a text file"),
    "json": (ValueError, r"model\.ckpt.* is not a PyTorch checkpoint: it looks like JSON"),
    "safetensors": (ValueError, r"model\.ckpt.* is not a PyTorch checkpoint: it looks like a safetensors file"),
    "tensor-not-dict": (ValueError, r"model\.ckpt.* holds a Tensor, not a checkpoint dict"),
    "hostile": (ValueError, r"Refusing to load checkpoint .*model\.ckpt.*posix\.system"),
}


def _load_pretrained(path: Path) -> None:
    from lightning_llm.loading import load_pretrained

    load_pretrained(path)


def _tokenizer(path: Path) -> None:
    from lightning_llm.data.tokenizer import Tokenizer

    Tokenizer.from_pretrained(path)


def _text_module(path: Path) -> None:
    from lightning_llm.data.text import TextDataModule

    TextDataModule(dataset=str(path), vocab_size=300, block_size=8, cache_dir=str(path.parent / "cache")).prepare_data()


def _preference_module(path: Path) -> None:
    from lightning_llm.data.preference import PreferenceDataModule

    dm = PreferenceDataModule(dataset=str(path), tokenizer_vocab_size=300, max_length=16, max_prompt_length=8)
    dm.prepare_data()
    dm.setup("fit")


def _saved_tokenizer(folder: Path, tokenizer_json: bytes | str) -> Path:
    tok = folder / "tok"
    _write(tok, "tokenizer.json", tokenizer_json)
    _write(tok, "special_ids.json", json.dumps({"eos_id": 0, "bos_id": None, "pad_id": 0, "name": "x"}))
    return tok


@dataclass
class Case:
    loader: Callable[[Path], None]
    make: Callable[[Path], Path]
    error: type[BaseException]
    match: str


CASES: dict[str, Case] = {}
for _name, _make in CKPT_INPUTS.items():
    _error, _match = CKPT_ERRORS[_name]
    CASES[f"load_checkpoint-{_name}"] = Case(load_checkpoint, _make, _error, _match)
    CASES[f"load_pretrained-{_name}"] = Case(_load_pretrained, _make, _error, _match)
CASES["load_checkpoint-missing"] = Case(load_checkpoint, lambda d: d / "nope.ckpt", FileNotFoundError, r"nope\.ckpt")
CASES["load_checkpoint-directory"] = Case(load_checkpoint, lambda d: d, ValueError, r"is a directory, expected one")
CASES["load_pretrained-folder-without-config"] = Case(
    _load_pretrained, lambda d: _write(d, "model/notes.txt", "x").parent, ValueError, r"config\.json"
)

SPECIAL_IDS = "special_ids.json"
CASES["tokenizer-truncated-json"] = Case(
    _tokenizer, lambda d: _saved_tokenizer(d, '{"version": "1.0", "model": {"type": "BPE", "vocab'), ValueError, "tok"
)
CASES["tokenizer-empty-json"] = Case(_tokenizer, lambda d: _saved_tokenizer(d, b""), ValueError, "tok")
CASES["tokenizer-not-utf8"] = Case(_tokenizer, lambda d: _saved_tokenizer(d, b"\xff\xfe{\x00"), ValueError, "tok")
CASES["tokenizer-wrong-format"] = Case(
    _tokenizer, lambda d: _saved_tokenizer(d, json.dumps({"hello": "world"})), ValueError, "tok"
)
CASES["tokenizer-missing-path"] = Case(
    _tokenizer, lambda d: d / "no_such_tokenizer", FileNotFoundError, r"no_such_tokenizer.*does not exist"
)

TEXT_INPUTS = {
    "empty-txt": ("data.txt", b"", r"data\.txt.* is empty \(0 bytes\); expected UTF-8 text"),
    "blank-txt": ("data.txt", b"  \n\n \n", r"data\.txt.* holds only blank lines"),
    "latin1-txt": ("data.txt", "ok line\n\ncaf\u00e9\n".encode("latin-1"), r"data\.txt.* is not UTF-8: line 3"),
    "empty-jsonl": ("data.jsonl", b"", r"data\.jsonl.* is empty \(0 bytes\); expected UTF-8 JSON Lines"),
    "malformed-jsonl": ("data.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"data\.jsonl.*: line 2 is not valid JSON"),
    "not-object-jsonl": ("data.jsonl", b'{"text": "a"}\n["b"]\n', r"data\.jsonl.*: line 2 holds a JSON list"),
    "missing-column-jsonl": ("data.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"row 1 .*has no 'text' value"),
    "latin1-jsonl": ("data.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"data\.jsonl.* is not UTF-8: line 1"),
    "malformed-json": ("data.json", b'[{"text": "a"},\n {"text": "b",}\n]', r"data\.json.* not valid JSON: line 2"),
    "scalar-json": ("data.json", b"42", r"data\.json.* holds a JSON int"),
    "wrong-suffix": ("data.csv", b"text\nhello\n", r"unsupported file type '\.csv'"),
}
for _name, (_file, _data, _match) in TEXT_INPUTS.items():
    CASES[f"TextDataModule-{_name}"] = Case(
        _text_module, lambda d, f=_file, b=_data: _write(d, f, b), ValueError, _match
    )

PREFERENCE_INPUTS = {
    "empty-jsonl": (b"", r"data\.jsonl.* is empty"),
    "malformed-jsonl": (b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n', r"data\.jsonl.*line 2"),
    "latin1-jsonl": ('{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"), r"not UTF-8"),
    "missing-field": (b'{"prompt": "p", "chosen": "a"}\n' * 4, r"rejected"),
}
for _name, (_data, _match) in PREFERENCE_INPUTS.items():
    CASES[f"PreferenceDataModule-{_name}"] = Case(
        _preference_module, lambda d, b=_data: _write(d, "data.jsonl", b), (ValueError, TypeError), _match
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    skip = {"cache", "hf_datasets"}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not skip.intersection(p.relative_to(folder).parts)
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error_and_no_side_effect(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache" / "hf_datasets"))
    case = CASES[name]
    folder = tmp_path / "inputs"
    folder.mkdir()
    path = case.make(folder)
    before = _snapshot(folder)
    with pytest.raises(case.error, match=case.match) as info:
        case.loader(path)
    message = str(info.value)
    assert "\n" not in message.strip() or len(message.splitlines()) <= 3, f"not a short message: {message[:500]}"
    assert _snapshot(folder) == before  # nothing created or modified beside the input
    assert not (folder / "PWNED").exists()
    streams = tmp_path / "cache" / "streams"
    assert not streams.exists() or not list(streams.iterdir())  # no token stream cached from a bad source


def test_table_covers_every_loader():
    loaders = {case.loader for case in CASES.values()}
    assert {load_checkpoint, _load_pretrained, _tokenizer, _text_module, _preference_module} <= loaders
    print(f"\n[faults] bad-input cases: {len(CASES)}", file=sys.stderr)
