"""The deploy workflow cannot run here: check that it builds with the Makefile's own targets and
publishes what the build writes."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yml").read_text())


def _runs() -> list[str]:
    return [step["run"] for job in WORKFLOW["jobs"].values() for step in job["steps"] if "run" in step]


def test_the_workflow_builds_and_tests_with_the_makefile_targets_ci_uses():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    called = [t for run in _runs() for t in re.findall(r"\bmake\s+([a-z]+)", run)]
    assert called and set(called) <= targets, f"make targets the Makefile lacks: {set(called) - targets}"
    assert "make test" in (ROOT / ".ci" / "run").read_text() and "test" in called, "the same test as CI"
    assert not any(re.search(r"\bpip install\b|jupyter-book build", run) for run in _runs()), \
        "installs and builds go through make, as in CI"


def test_the_workflow_publishes_the_site_and_the_editions_the_colab_buttons_open():
    import importlib.util

    spec = importlib.util.spec_from_file_location("editions", ROOT / "_ext" / "editions.py")
    editions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(editions)
    steps = [s for job in WORKFLOW["jobs"].values() for s in job["steps"]]
    pages = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert pages["with"]["path"] == "_build/html"
    publish = next(run for run in _runs() if "_build/editions/colab" in run)
    assert f"push -f origin {editions.EDITIONS_BRANCH}" in publish and "colab/" in publish
    assert "_build/editions/student" in publish and "student" in publish.split("git add")[1], "the student edition"
    assert WORKFLOW["jobs"]["build"]["timeout-minutes"] >= 90, "a cold build and its tests take most of an hour"
