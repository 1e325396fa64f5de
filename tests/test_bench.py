"""The build's self-measurement (_ext/bench.py): which kernel ran which chapter, and cold or warm."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_ext", ROOT / "_ext" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_cache_is_cold_until_an_artifact_is_written(tmp_path):
    assert bench.cache_state(tmp_path / "missing") == "cold"
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / ".tuned.lock").write_text("")
    assert bench.cache_state(tmp_path) == "cold", "a lock file is not an artifact"
    (tmp_path / "tokenizer" / "smollm2").mkdir(parents=True)
    (tmp_path / "tokenizer" / "smollm2" / "tokenizer.json").write_text("{}")
    assert bench.cache_state(tmp_path) == "cold", "the packaged model's tokenizer, converted, is not a result"
    (tmp_path / "adapters" / "tuned" / "adapter_model.safetensors").parent.mkdir()
    (tmp_path / "adapters" / "tuned" / "adapter_model.safetensors").write_text("x")
    assert bench.cache_state(tmp_path) == "warm"


def _part(shas, seconds):
    return {"cells": [{"sha": s, "line": f"# {s}", "seconds": t} for s, t in zip(shas, seconds)],
            "wall_s": sum(seconds), "peak_rss_mb": 900}


def test_kernels_are_matched_to_chapters_by_their_own_cells():
    chapters = {"chapters/a.ipynb": ["setup", "a1", "a2"], "chapters/b.ipynb": ["setup", "b1"]}
    parts = [_part(["setup", "b1"], [1.0, 5.0]), _part(["setup", "a1", "a2"], [1.0, 2.0, 9.0]),
             _part(["setup"], [1.0])]  # a kernel that ran only the shared setup cell is no chapter
    rows = bench.match(parts, chapters)
    assert [r["chapter"] for r in rows] == ["chapters/a.ipynb", "chapters/b.ipynb"]
    a = rows[0]
    assert [c["cell"] for c in a["slowest_cells"]] == [3, 2, 1]
    assert a["slowest_cells"][0]["seconds"] == 9.0 and a["wall_s"] == 12.0
    table = bench.markdown({"cache": "cold", "reference_s": 3.2, "chapters": rows})
    assert "`chapters/a.ipynb` | 12 | 900 | 9 (cell 3)" in table and "**cold**" in table


def test_every_chapter_has_cells_of_its_own():
    """Matching needs each chapter to differ from the others in at least one code cell."""
    cells = bench.chapter_cells(ROOT)
    common = bench._common(cells)
    assert cells and all(set(c) - common for c in cells.values())
