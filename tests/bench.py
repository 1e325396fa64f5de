"""`make bench`: execute each chapter in a fresh kernel from a cold cache (nothing trained yet);
record wall time, the kernel's peak RSS and the model-load times into _build/bench.json, and a
table into bench.md, which the book's status page includes (commit it after a bench run)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "bench.json"
TABLE = ROOT / "bench.md"
PEAK = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [ROOT / f"{e['file']}.ipynb" for e in toc["chapters"] if (ROOT / f"{e['file']}.ipynb").exists()]


def run_chapter(path: Path) -> dict:
    """Execute one notebook in a fresh kernel; its last cell reports the kernel's peak RSS."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK))
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - start
    peak_kb = int(nb.cells[-1].outputs[0]["text"].strip())
    return {"chapter": str(path.relative_to(ROOT)), "wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024)}


def model_load_seconds(name: str) -> float:
    """Seconds to import safetybook and load one model, in a fresh process."""
    code = ("import time; t = time.perf_counter(); from safetybook.models import load_model; "
            f"load_model({name!r}); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def table(rows: list[dict], loads: dict[str, float]) -> str:
    """The status page's benchmark section, in Markdown."""
    total = sum(r["wall_s"] for r in rows)
    lines = [
        (f"Measured by `make bench` on {date.today().isoformat()}: {os.cpu_count()} CPU cores, "
         f"{platform.machine()}, torch {_version('torch')} with {os.environ.get('OMP_NUM_THREADS', 'default')} "
         "threads, each chapter in a fresh kernel, in book order, starting from an empty cache (so the training "
         "chapter trains its adapters and later chapters load them)."),
        "",
        "| chapter | wall time (s) | kernel peak RSS (MB) |",
        "|---|---:|---:|",
        *[f"| `{r['chapter']}` | {r['wall_s']:.0f} | {r['peak_rss_mb']} |" for r in rows],
        f"| **whole book** | **{total:.0f}** ({total / 60:.1f} min) | max {max(r['peak_rss_mb'] for r in rows)} |",
        "",
        "Loading a model in a fresh process, import included (cache warm): "
        + ", ".join(f"`{name}` {seconds:.1f} s" for name, seconds in loads.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str]) -> int:
    """``bench.py [CHAPTER ...]``: all chapters of the table of contents, or only the named ones
    (their rows replace the old ones). ``BENCH_CACHE`` names the cache folder to start from
    (default: a new empty one), so a bench can be run in parts, in book order."""
    wanted = set(argv)
    unknown = wanted - {p.stem for p in chapters()}
    if unknown:
        print(f"bench: not a chapter in _toc.yml: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    os.environ["SAFETYBOOK_CACHE"] = os.environ.get("BENCH_CACHE") or tempfile.mkdtemp(prefix="safetybook-bench-")
    print("cache:", os.environ["SAFETYBOOK_CACHE"], flush=True)
    new: dict[str, dict] = {}
    for path in chapters():
        if wanted and path.stem not in wanted:
            continue
        row = run_chapter(path)
        print(f"{row['chapter']:40s} {row['wall_s']:7.1f} s  {row['peak_rss_mb']:6d} MB", flush=True)
        new[row["chapter"]] = row
    old = {r["chapter"]: r for r in json.loads(OUT.read_text())} if wanted and OUT.exists() else {}  # read late:
    old.update(new)  # parts may run side by side
    rows = [old[c] for c in (str(p.relative_to(ROOT)) for p in chapters()) if c in old]
    loads = {name: model_load_seconds(name) for name in ("base", "tuned")}
    print("model load (s):", loads)
    OUT.parent.mkdir(exist_ok=True)
    for path, text in ((OUT, json.dumps(rows, indent=1)), (OUT.parent / "bench-model-load.json", json.dumps(loads)),
                       (TABLE, table(rows, loads))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
