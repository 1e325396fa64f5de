"""The build's fix for myst-nb's stream merging: a cell's lines show once, however often it is read."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("merged_streams", ROOT / "_ext" / "merged_streams.py")
merged_streams = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merged_streams)


def _outputs():
    stream = nbformat.v4.new_output
    return [stream("stream", name="stderr", text="trained the 'repaired' adapter\n"),
            stream("stream", name="stdout", text="repaired ready\n"),
            stream("stream", name="stderr", text="trained the 'control' adapter\n")]


def test_merging_twice_gives_the_same_lines_once_and_leaves_the_outputs_alone():
    from myst_nb.core import render, utils

    outputs = _outputs()
    kept = copy.deepcopy(outputs)
    # myst-nb's own merge edits the first stream in place: a second read repeats the later lines
    raw = _outputs()
    utils.coalesce_streams(raw)
    again = next(o for o in utils.coalesce_streams(raw) if o["name"] == "stderr")["text"]
    assert again.count("control") == 2, "myst-nb's merge no longer edits in place: drop _ext/merged_streams.py"
    merged_streams.setup(type("App", (), {})())
    first, second = render.coalesce_streams(outputs), render.coalesce_streams(outputs)
    assert first == second and outputs == kept
    stderr = next(o for o in first if o["name"] == "stderr")["text"]
    assert stderr.count("control") == 1 and stderr.count("repaired") == 1
