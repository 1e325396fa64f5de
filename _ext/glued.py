"""The glued values of an executed chapter, as the book prints them (shared by ``bench`` and ``editions``).

myst-nb keeps each executed chapter's glued outputs in ``<chapter>.glue.json`` beside the executed
notebook. ``{glue:text}`name:spec``` in markdown shows one of them, formatted by ``spec``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

GLUE = re.compile(r"\{glue:text\}`([^`:]+)(?::([^`]*))?`")


def read_glue(folder: Path | None, chapter: str) -> dict:
    """The glued outputs of ``chapter`` in ``folder`` (empty when the chapter did not run)."""
    path = folder / f"{chapter}.glue.json" if folder else None
    return json.loads(path.read_text()) if path and path.exists() else {}


def glued_text(glue: dict, name: str, spec: str | None = "") -> str | None:
    """The value glued as ``name``, formatted as the book prints it (myst-nb's own rule), or None."""
    from myst_nb.core.variables import format_plain_text

    entry = glue.get(name)
    return None if entry is None else format_plain_text(entry["data"].get("text/plain", ""), spec or "")
