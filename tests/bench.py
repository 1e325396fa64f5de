"""`make bench`: execute each chapter in a fresh kernel; record wall time, the kernel's peak RSS,
and the model-load times, into _build/bench.json (shown on the book's status page)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "bench.json"
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


def main() -> int:
    rows = []
    for path in chapters():
        row = run_chapter(path)
        print(f"{row['chapter']:40s} {row['wall_s']:7.1f} s  {row['peak_rss_mb']:6d} MB", flush=True)
        rows.append(row)
    loads = {name: model_load_seconds(name) for name in ("base", "tuned")}
    print("model load (s):", loads)
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(OUT)
    (OUT.parent / "bench-model-load.json").write_text(json.dumps(loads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
