"""Sphinx extension: every executed build measures itself and writes ``_build/bench.json``.

- When the build starts, it notes whether the cache held anything (``"cold"`` or ``"warm"``)
  and times a fixed reference workload in a fresh process (the base model's refusal score on
  32 fixed prompts), so builds on machines of different speed can be compared.
- Each kernel the build starts times its cells (``kernel_timer.py``, an IPython startup file).
- The status page (docname ``status``, read after every chapter) gets a table of this build's
  chapters and their slowest cells; at the end the same numbers go into ``_build/bench.json``:
  ``{"cache", "reference_s", "chapters": [{"chapter", "wall_s", "peak_rss_mb", "slowest_cells"}]}``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling module; the tests load this file by path
from glued import GLUE, glued_text, read_glue

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- bench table -->"
PLAN_MARKER = "<!-- course plan -->"
#: The instructor page's course plan: sessions of about 90 minutes, each with its chapters.
SESSIONS = [
    ("the grid, the model, and a measure of refusal checked against what models say", ["00_start"]),
    ("a safety fine-tune, the training data behind it, and a repair", ["01_training"]),
    ("critical tokens and attention steering", ["02_input"]),
    ("probes and the refusal direction: necessary, sufficient, gated", ["03a_probe", "03b_perturb"]),
    ("features, weight edits, and monitors while the model answers", ["03c_decipher", "04_generation"]),
    ("what worked: the verdict table, the open challenges, student projects", ["05_outlook"]),
]
EXERCISE = re.compile(r"```\{exercise\}[^\n]*\n(?::[\w-]+:[^\n]*\n)*\s*\*\*(.+?)\*\*\s*\(([^)]*)\)\.?\s*(.*?)\n```", re.DOTALL)
SLOWEST = 5
REFERENCE = """
import time
from safetybook.data import prompts
from safetybook.zoo import load_model
from safetybook.refusal import refusal_score
model, tok = load_model("base")
fixed = prompts("harmful", "train")[:16] + prompts("harmless", "train")[:16]
refusal_score(model, tok, fixed[:2])  # warm-up
start = time.perf_counter()
refusal_score(model, tok, fixed)
print(time.perf_counter() - start)
"""


def cache_root() -> Path:
    return Path(os.environ.get("SAFETYBOOK_CACHE", ROOT / ".cache"))


#: Cache folders that only hold the packaged model in another format (its fp32 weights and its tokenizer,
#: converted from the GGUF file in seconds): they are not computed results, so they leave a cache cold.
CONVERSIONS = ("base", "tokenizer")


def cache_state(root: Path) -> str:
    """"cold" if the cache holds nothing the book computes (no adapter, answer, score, probe, …: lock
    files and the model's format conversions do not count), else "warm"."""
    if not root.is_dir():
        return "cold"
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".lock") and path.relative_to(root).parts[0] not in CONVERSIONS:
            return "warm"
    return "cold"


def reference_seconds() -> float | None:
    """Seconds of the reference workload in a fresh process (None if it fails)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", REFERENCE], capture_output=True, text=True, env=env, check=False)
    try:
        return round(float(result.stdout.strip().splitlines()[-1]), 2)
    except (IndexError, ValueError):
        print(f"bench: the reference workload failed: {result.stderr.strip()[-500:]}", file=sys.stderr)
        return None


def _sha(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def chapter_cells(srcdir: Path) -> dict[str, list[str]]:
    """Each chapter notebook's code cells, as hashes of their sources."""
    out = {}
    for path in sorted((srcdir / "chapters").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        out[str(path.relative_to(srcdir))] = [_sha(c.source) for c in nb.cells if c.cell_type == "code"]
    return out


def match(parts: list[dict], chapters: dict[str, list[str]]) -> list[dict]:
    """One row per chapter that ran: the kernel whose executed cells are that chapter's code cells
    (the setup cell is the same in every chapter, so all cells are compared)."""
    rows = {}
    for part in parts:
        executed = [c["sha"] for c in part["cells"]]
        best = max(chapters, key=lambda ch: len(set(executed) & set(chapters[ch])), default=None)
        if best is None or not set(executed) & set(chapters[best]) - _common(chapters):
            continue  # a kernel that ran no chapter's own code (a status page, a stray notebook)
        slow = sorted(range(len(part["cells"])), key=lambda i: -part["cells"][i]["seconds"])[:SLOWEST]
        peaks = [c.get("peak_rss_mb", 0) for c in part["cells"]]
        rows[best] = {
            "chapter": best,
            "wall_s": part.get("wall_s", 0.0),
            "peak_rss_mb": part.get("peak_rss_mb", 0),
            "cells": len(executed),
            # the cell during which the kernel reached its peak memory (1-based, like the slowest cells)
            "peak_rss_cell": peaks.index(max(peaks)) + 1 if peaks and max(peaks) else None,
            "slowest_cells": [{"cell": i + 1, "seconds": part["cells"][i]["seconds"], "first_line": part["cells"][i]["line"]}
                              for i in slow],
        }
    return [rows[ch] for ch in chapters if ch in rows]


def _common(chapters: dict[str, list[str]]) -> set[str]:
    """Cell hashes that more than one chapter shares (the setup cell)."""
    seen, common = set(), set()
    for cells in chapters.values():
        common |= seen & set(cells)
        seen |= set(cells)
    return common


def read_parts(folder: Path) -> list[dict]:
    parts = []
    for path in sorted(folder.glob("kernel-*.json")):
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return parts


def markdown(report: dict) -> str:
    """The status page's benchmark section."""
    rows = report["chapters"]
    if not rows:
        return "*No chapter was executed in this build, so there is nothing to show.*\n"
    total = sum(r["wall_s"] for r in rows)
    ref = report["reference_s"]
    lines = [
        f"Cache at the start of this build: **{report['cache']}**"
        + (" (nothing was trained yet: the training chapter trained its adapters)." if report["cache"] == "cold"
           else " (adapters and other artifacts were already cached)."),
        "Reference workload (the base model's refusal score on 32 fixed prompts, in a fresh process): "
        + (f"**{ref:.1f} s**." if ref is not None else "not measured."),
        "",
        "| chapter | wall time (s) | kernel peak RSS (MB) | reached in cell | slowest cell (s) |",
        "|---|---:|---:|---:|---|",
        *[f"| `{r['chapter']}` | {r['wall_s']:.0f} | {r['peak_rss_mb']} | {r.get('peak_rss_cell') or ''} | "
          + (f"{r['slowest_cells'][0]['seconds']:.0f} (cell {r['slowest_cells'][0]['cell']}) |" if r["slowest_cells"]
             else " |") for r in rows],
        f"| **whole book** | **{total:.0f}** ({total / 60:.1f} min) | max {max(r['peak_rss_mb'] for r in rows)} | | |",
        "",
        "The slowest cells of each chapter (cell numbers count code cells from 1):",
        "",
        "| chapter | cell | seconds | first line |",
        "|---|---:|---:|---|",
    ]
    for r in rows:
        for cell in r["slowest_cells"][:3]:
            text = cell["first_line"].replace("|", "\\|").replace("`", "'")
            lines.append(f"| `{Path(r['chapter']).stem}` | {cell['cell']} | {cell['seconds']:.1f} | `{text}` |")
    return "\n".join(lines) + "\n"


def exercises(srcdir: Path, glue_dir: Path | None = None) -> dict[str, list[tuple[str, str, str]]]:
    """Each chapter's exercises, read from the notebooks: (title, level and time, what it asks first).
    A glued number in an exercise's text gets this build's value (from ``glue_dir``), if there is one."""
    out = {}
    for path in sorted((srcdir / "chapters").glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        glue = read_glue(glue_dir, path.stem)
        text = GLUE.sub(lambda m, glue=glue: glued_text(glue, m.group(1), m.group(2)) or m.group(1),
                        "\n".join(c.source for c in cells if c.cell_type == "markdown"))
        out[path.stem] = [(t, level, " ".join(re.split(r"(?<=[.?!])\s", " ".join(rest.split()))[:2]))
                          for t, level, rest in EXERCISE.findall(text)]
    return out


def course_plan(report: dict, srcdir: Path, glue_dir: Path | None = None) -> str:
    """The instructor page's course plan, with each chapter's run time in this build, and its exercises."""
    seconds = {Path(r["chapter"]).stem: r["wall_s"] for r in report["chapters"]}
    found = exercises(srcdir, glue_dir)
    lines = ["| session | chapters | what it covers | run time in this build (min) | exercises |", "|---|---|---|---:|---:|"]
    for n, (what, chapters) in enumerate(SESSIONS, start=1):
        run = sum(seconds.get(c, 0.0) for c in chapters)
        shown = f"{run / 60:.1f}" if all(c in seconds for c in chapters) else "not run in this build"
        lines.append(f"| {n} | {', '.join(f'`{c}`' for c in chapters)} | {what} | {shown} | "
                     f"{sum(len(found.get(c, [])) for c in chapters)} |")
    lines += ["", "What each exercise practises (its title, level and time, and how it opens):", "",
              "| chapter | exercise | level, time | the task |", "|---|---|---|---|"]
    for chapter, rows in found.items():
        for title, level, ask in rows:
            lines.append(f"| `{chapter}` | {title} | {level} | {ask.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, app):
        self.app = app
        out = Path(app.outdir)
        # jupyter-book builds into _build/html: the report goes beside it, into _build
        self.build_dir = out.parent if out.name == "html" else out
        self.parts = self.build_dir / "bench-parts"
        self.report = {"cache": "warm", "reference_s": None, "chapters": []}

    def start(self, app):
        if getattr(app.config, "nb_execution_mode", "force") == "off":
            return  # nothing will be executed: nothing to measure
        self.report["cache"] = cache_state(cache_root())
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True)
        ipython = self.build_dir / "ipython" / "profile_default" / "startup"
        ipython.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).with_name("kernel_timer.py"), ipython / "00-safetybook-timer.py")
        os.environ["IPYTHONDIR"] = str(self.build_dir / "ipython")  # the kernels inherit the environment
        os.environ["SAFETYBOOK_BENCH_PARTS"] = str(self.parts)
        started = time.perf_counter()
        self.report["reference_s"] = reference_seconds()
        print(f"bench: cache {self.report['cache']}, reference workload {self.report['reference_s']} s "
              f"({time.perf_counter() - started:.0f} s with loading)", file=sys.stderr)

    def collect(self) -> dict:
        if not self.parts.exists():
            return self.report
        self.report["chapters"] = match(read_parts(self.parts), chapter_cells(Path(self.app.srcdir)))
        return self.report

    def source_read(self, app, docname, source):
        if docname == "status" and MARKER in source[0]:
            source[0] = source[0].replace(MARKER, markdown(self.collect()))
        if docname == "instructor" and PLAN_MARKER in source[0]:
            source[0] = source[0].replace(PLAN_MARKER, course_plan(self.collect(), Path(app.srcdir),
                                                                self.build_dir / "jupyter_execute" / "chapters"))

    def finished(self, app, exception):
        report = self.collect()
        if not report["chapters"]:
            return  # nothing was executed (a build with execution off): keep the last report
        path = self.build_dir / "bench.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)
        total = sum(r["wall_s"] for r in report["chapters"])
        print(f"bench: {len(report['chapters'])} chapters in {total:.0f} s -> {path}", file=sys.stderr)


def setup(app):
    bench = Bench(app)
    app.connect("builder-inited", bench.start)
    app.connect("source-read", bench.source_read)
    app.connect("build-finished", bench.finished)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
