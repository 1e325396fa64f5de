"""The chapters as stored: no outputs (Colab opens them clean), one setup cell, one repository URL."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("**/*.ipynb"))


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def setup_cell(path: Path) -> str:
    code = [source(c) for c in cells(path) if c["cell_type"] == "code"]
    return code[0]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    for cell in cells(path):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name}: a cell has stored outputs; clear them"
            assert cell.get("execution_count") is None, f"{path.name}: stored execution count"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_starts_with_the_same_setup_cell(path):
    reference = setup_cell(ROOT / "chapters" / "00_start.ipynb")
    assert setup_cell(path) == reference, f"{path.name}: the first code cell must be the shared setup cell"


def test_setup_cell_points_at_the_configured_repository():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = re.search(r'BOOK = "([^"]+)"', setup_cell(ROOT / "chapters" / "00_start.ipynb")).group(1)
    assert url == config["repository"]["url"], "the repository URL lives in _config.yml; the setup cell must match"


def test_every_chapter_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for path in CHAPTERS:
        assert str(path.relative_to(ROOT).with_suffix("")) in toc, f"{path.name} is not in _toc.yml"
