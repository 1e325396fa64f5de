"""One record of the survey's tools (data/tools.jsonl): every tools table of the book is rendered from it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from safetybook.data import TOOL_STAGES, TOOL_STATUS, DataError, tools
from safetybook.display import tools_table

ROOT = Path(__file__).resolve().parents[1]


def test_every_tool_has_a_known_stage_status_chapter_and_citation():
    rows = tools()
    assert len({(r["stage"], r["tool"]) for r in rows}) == len(rows), "a tool is listed twice in a stage"
    keys = set(re.findall(r"@\w+\{([^,]+),", (ROOT / "references.bib").read_text()))
    for r in rows:
        assert r["stage"] in TOOL_STAGES and r["runs"] in TOOL_STATUS, r
        assert r["chapter"] is None or (ROOT / "chapters" / f"{r['chapter']}.ipynb").exists(), r
        assert r["cite"] is None or r["cite"] in keys, r
        assert r["runs"] == "not tried" or r["why"], f"{r['tool']}: say why it runs only so far"
    assert {r["stage"] for r in rows} == set(TOOL_STAGES)


def test_a_stage_table_has_one_row_per_tool_and_the_closing_matrix_has_them_all():
    for stage in TOOL_STAGES:
        body = tools_table(stage).splitlines()[2:]
        assert len(body) == len(tools(stage))
    every = tools_table().splitlines()
    assert every[0].startswith("| Stage |") and len(every) == 2 + len(tools())
    kronfluence = next(line for line in every if "Kronfluence" in line)
    assert "**yes**" in kronfluence and "{doc}`01_training`" in kronfluence


def test_no_chapter_types_a_tools_table_of_its_own():
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            text = "".join(cell["source"])
            assert not re.search(r"^\| (Stage \| )?Tool \|", text, re.MULTILINE), f"{path.name}: render it with tools_table"
            if "tools_table(" in text:
                assert cell["metadata"].get("mystnb", {}).get("markdown_format") == "myst", path.name


def test_an_unknown_stage_is_refused():
    with pytest.raises(DataError, match="unknown stage"):
        tools("deployment")


def test_a_tool_that_runs_in_a_chapter_is_imported_there():
    """A "yes" with a chapter claims that the chapter's code runs the package, not just names it."""
    for r in tools():
        if r["runs"] != "yes" or r["chapter"] is None or " " in r["install"]:
            continue
        module = r["install"].replace("-", "_")
        cells = json.loads((ROOT / "chapters" / f"{r['chapter']}.ipynb").read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert re.search(rf"^\s*(import|from) {module}\b", code, re.MULTILINE), f"{r['tool']}: not imported in {r['chapter']}"
