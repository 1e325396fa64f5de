"""The built site in a real browser (headless Chromium): what a reader would see.

Needs Debian's `chromium` (`.ci/run` installs it); skipped locally without it, required in CI.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import HTML, ROOT, toc_files

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = ROOT / "_build" / "screenshots"

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("headless Chromium not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(build):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                               "--directory", str(HTML)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def visit(browser, url: str):
    """Open ``url``; return the page and the console errors it logged."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, wait_until="networkidle")
    return page, errors


@pytest.mark.parametrize("name", toc_files())
def test_page_renders_cleanly(site, browser, name):
    page, errors = visit(browser, f"{site}/{name}.html")
    assert not errors, f"{name}: console errors {errors}"
    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    assert not broken, f"{name}: images that did not load: {broken}"
    text = page.inner_text("main")
    assert "Traceback (most recent call last)" not in text, f"{name}: a cell shows a traceback"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name.replace('/', '_')}.png"), full_page=False)
    page.close()


@pytest.mark.parametrize("name", [f for f in toc_files() if f.startswith("chapters/")])
def test_launch_buttons_point_at_the_chapter(site, browser, name):
    """Colab opens the chapter's Colab edition (the editions branch, _ext/editions.py), and the page's
    student-edition link opens that chapter's student edition; Binder opens the chapter."""
    page, _ = visit(browser, f"{site}/{name}.html")
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    colab = [h for h in hrefs if "colab.research.google.com" in h]
    binder = [h for h in hrefs if "mybinder.org" in h]
    stem = name.split("/")[-1]
    editions = {f"/blob/editions/{kind}/{stem}.ipynb" for kind in ("colab", "student")}
    assert {e for e in editions if any(h.endswith(e) for h in colab)} == editions, f"{name}: Colab links {colab}"
    assert all(any(h.endswith(e) for e in editions) for h in colab), f"{name}: Colab links {colab}"
    assert binder and all(h.endswith(f"{name}.ipynb") for h in binder), f"{name}: Binder links {binder}"
    page.close()


def test_search_finds_a_chapter(site, browser):
    page, errors = visit(browser, f"{site}/search.html?q=logit")
    page.wait_for_selector("#search-results li", timeout=20000)
    results = page.inner_text("#search-results")
    assert "Start here" in results, f"search for 'logit' did not find the opening chapter: {results[:300]}"
    assert not errors, errors
    page.close()
