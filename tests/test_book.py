"""The whole book, executed from scratch with warnings as errors: the test that CI really needs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import HTML, toc_files


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


def test_the_build_measures_every_chapter(build):
    """The executed build writes _build/bench.json (_ext/bench.py) and shows the same table on the status page."""
    report = json.loads((HTML.parent / "bench.json").read_text())
    assert report["cache"] in ("cold", "warm")
    assert report["reference_s"] is not None and report["reference_s"] > 0
    chapters = [f"{page}.ipynb" for page in toc_files() if page.startswith("chapters/")]
    assert [row["chapter"] for row in report["chapters"]] == chapters
    status = (HTML / "status.html").read_text()
    assert "Reference workload" in status and "whole book" in status
    for row in report["chapters"]:
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 100, row
        seconds = [cell["seconds"] for cell in row["slowest_cells"]]
        assert seconds and seconds == sorted(seconds, reverse=True), row
        assert all(1 <= cell["cell"] <= row["cells"] for cell in row["slowest_cells"]), row
        assert row["chapter"] in status


@pytest.mark.parametrize("page", toc_files())
def test_page_loads_nothing_from_the_network(build, page):
    """An offline reader cannot fetch a script, style or image from a CDN. Jupyter widgets (tqdm bars in a
    kernel) are the usual culprit: myst-nb adds require.js and the widget manager from CDNs for them."""
    html = (HTML / f"{page}.html").read_text()
    external = re.findall(r'<(?:script|link|img|iframe)[^>]+(?:src|href)="(https?://[^"]+)"', html)
    assert not external, f"{page} loads {external}"


@pytest.mark.parametrize("page", [f for f in toc_files() if f.startswith("chapters/")])
def test_executed_chapter_has_no_widgets(build, page):
    """A widget's saved text is its first frame ("0%"), not its end: the library keeps progress bars out of
    the build (TQDM_DISABLE, transformers' bars off)."""
    executed = HTML.parent / "jupyter_execute" / f"{page}.ipynb"
    assert "application/vnd.jupyter.widget-view+json" not in executed.read_text(), f"{page} has a widget output"


def test_the_build_writes_a_colab_edition_of_every_chapter_with_its_numbers(build):
    from tests.test_editions import editions

    folder = HTML.parent / "editions" / "colab"
    for page in [f for f in toc_files() if f.startswith("chapters/")]:
        nb = json.loads((folder / f"{Path(page).name}.ipynb").read_text())
        prose = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        assert not editions.MARKUP.search(prose), f"{page}: MyST markup left in the Colab edition"
        assert "run the notebook]" not in prose, f"{page}: a glued value is missing from the edition"
        html = (HTML / f"{page}.html").read_text()
        assert (HTML / "editions" / "colab" / f"{Path(page).name}.ipynb").exists(), f"{page}: not on the site"
        assert f"/blob/editions/colab/{Path(page).name}.ipynb" in html, f"{page}: Colab opens the source, not the edition"
        assert f'href="../editions/colab/{Path(page).name}.ipynb"' in html, f"{page}: no download link"


def test_the_instructor_page_has_the_course_plan_with_this_builds_times(build):
    from tests.test_bench import bench

    page = (HTML / "instructor.html").read_text()
    n_exercises = sum(len(rows) for rows in bench.exercises(HTML.parents[1]).values())
    assert "<!-- course plan -->" not in page
    assert page.count("<tr") >= 2 + len(bench.SESSIONS) + n_exercises, "a row per session and per exercise"
    assert "not run in this build" not in page, "every chapter ran in the build, so each has a time"
