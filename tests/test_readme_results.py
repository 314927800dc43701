"""The README's result tables are generated from the benchmarks' saved JSON outputs, never typed by hand.

``benchmarks/readme_tables.py --check`` renders every ``<!-- results: NAME -->`` block of README.md from
``benchmarks/results/NAME.json`` and fails when the README differs: a number edited by hand, or a rerun benchmark
whose README block was not regenerated, makes this test fail.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_result_blocks_match_their_json(tables, capsys):
    text = (ROOT / "README.md").read_text()
    names = [m.group("name") for m in tables.BLOCK.finditer(text)]
    assert len(names) >= 3, names  # the generated tables exist
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def test_a_hand_edit_is_caught(tables, tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    block = next(tables.BLOCK.finditer(text))
    body = block.group("body")
    edited = text.replace(body, body.replace("|", "| 1", 1), 1)  # one cell changed by hand
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert block.group("name") in capsys.readouterr().out
    assert tables.main(["--readme", str(readme)]) == 0  # regenerating restores the JSON's numbers
    assert readme.read_text() == text


def test_every_block_cites_machine_and_commit(tables):
    text = (ROOT / "README.md").read_text()
    for m in tables.BLOCK.finditer(text):
        payload = json.loads((tables.RESULTS / f"{m.group('name')}.json").read_text())
        commit = str(payload["machine"]["commit"])[:7]
        assert f"commit `{commit}" in m.group("body"), m.group("name")
