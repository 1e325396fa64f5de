"""The whole book, executed from scratch with warnings as errors: the test that CI really needs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [entry["file"] for entry in toc["chapters"]]


@pytest.fixture(scope="module")
def build():
    jb = Path(sys.executable).parent / "jupyter-book"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(jb), "build", ".", "-W", "-n", "--keep-going"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=75 * 60)
    if result.returncode != 0:
        logs = "\n".join(p.read_text()[-4000:] for p in (HTML / "reports").glob("**/*.log")) if (HTML / "reports").exists() else ""
        warnings = "\n".join(line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line)
        pytest.fail(f"book build failed (exit {result.returncode}).\n{warnings[-6000:]}\n{result.stdout[-3000:]}\n{logs}")
    return result


def test_book_builds_without_warnings(build):
    assert "build succeeded" in build.stdout


@pytest.mark.parametrize("page", [f for f in toc_files() if f.startswith("chapters/")])
def test_chapter_executed_with_figures_and_no_errors(build, page):
    html = (HTML / f"{page}.html").read_text()
    assert "Traceback (most recent call last)" not in html, f"{page}: a cell shows a traceback"
    assert not re.search(r'class="[^"]*output (error|traceback)', html), f"{page}: an error output"
    assert re.search(r'<img[^>]+src="[^"]*_images/[^"]+\.png"', html), f"{page}: no executed figure"


def test_status_page_lists_every_chapter(build):
    status = (HTML / "status.html").read_text()
    for page in toc_files():
        if page.startswith("chapters/"):
            assert Path(page).name in status, f"{page} missing from the execution table"
