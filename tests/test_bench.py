"""The build's self-measurement (_ext/bench.py): which kernel ran which chapter, and cold or warm."""
from __future__ import annotations

import importlib.util
import json
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
    peaks = [400 + 500 * (i == 1) for i in range(len(shas))]  # the peak is reached in the second cell
    return {"cells": [{"sha": s, "line": f"# {s}", "seconds": t, "peak_rss_mb": m} for s, t, m in zip(shas, seconds, peaks)],
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
    assert a["peak_rss_cell"] == 2
    table = bench.markdown({"cache": "cold", "reference_s": 3.2, "chapters": rows})
    assert "`chapters/a.ipynb` | 12 | 900 | 2 | 9 (cell 3)" in table and "**cold**" in table


def test_every_chapter_has_cells_of_its_own():
    """Matching needs each chapter to differ from the others in at least one code cell."""
    cells = bench.chapter_cells(ROOT)
    common = bench._common(cells)
    assert cells and all(set(c) - common for c in cells.values())


def test_the_kernel_timer_records_every_cell(tmp_path):
    """The IPython startup file, in a real kernel: one record per cell, with its time and the peak so far."""
    import json
    import os
    import shutil

    import nbformat
    from nbclient import NotebookClient

    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    shutil.copy(ROOT / "_ext" / "kernel_timer.py", startup / "00-timer.py")
    parts = tmp_path / "parts"
    parts.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("import time; time.sleep(0.3)")])
    env = {"IPYTHONDIR": str(tmp_path / "ipython"), "SAFETYBOOK_BENCH_PARTS": str(parts)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert not any(o.get("output_type") == "error" or "Error" in str(o.get("text", "")) for c in nb.cells for o in c.outputs)
    (record,) = [json.loads(p.read_text()) for p in parts.glob("kernel-*.json")]
    assert [c["line"] for c in record["cells"]] == ["x = 1", "import time; time.sleep(0.3)"]
    assert record["cells"][1]["seconds"] >= 0.3 > record["cells"][0]["seconds"]
    assert record["peak_rss_mb"] == record["cells"][-1]["peak_rss_mb"] > 10


def test_the_course_plan_has_every_chapter_its_time_and_every_exercise():
    report = {"chapters": [{"chapter": f"chapters/{p.stem}.ipynb", "wall_s": 90.0}
                           for p in sorted((ROOT / "chapters").glob("*.ipynb")) if p.stem != "05_outlook"]}
    plan = bench.course_plan(report, ROOT)
    planned = {c for _, chapters in bench.SESSIONS for c in chapters}
    assert planned == {p.stem for p in (ROOT / "chapters").glob("*.ipynb")}, "every chapter in one session"
    assert "| 1 | `00_start` |" in plan and "| 1.5 | 3 |" in plan  # 90 s, and chapter 0's three exercises
    assert "not run in this build" in plan  # 05_outlook has no time in this report
    found = bench.exercises(ROOT)
    n_exercises = sum(len(v) for v in found.values())
    n_blocks = sum("".join(c["source"]).count("```{exercise}") for p in (ROOT / "chapters").glob("*.ipynb")
                   for c in json.loads(p.read_text())["cells"])
    assert n_exercises == n_blocks, "an exercise the plan could not read"
    assert all(title and level and task for rows in found.values() for title, level, task in rows)
