"""How the book shows things: harmful completions only ever truncated, and the tools tables."""
from __future__ import annotations

TRUNCATE_WORDS = 6


def truncate(text: str, words: int = TRUNCATE_WORDS) -> str:
    """The first few words of a completion, marked as cut: the only way the book shows
    an answer to a harmful prompt."""
    parts = text.split()
    if len(parts) <= words:
        return " ".join(parts)
    return " ".join(parts[:words]) + " […]"


def tools_table(stage: str | None = None) -> str:
    """The tools of one stage (or all, with a stage column) as a MyST table, rendered from
    ``data/tools.jsonl``: show it with ``IPython.display.Markdown`` in a cell whose metadata sets
    ``mystnb.markdown_format: myst`` (so that its citations and chapter links resolve)."""
    from .data import tools

    head = (["Stage"] if stage is None else []) + ["Tool", "What it does", "Install", "Runs here?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tools(stage):
        name = t["tool"] + (f" {{cite}}`{t['cite']}`" if t["cite"] else "")
        install = " ".join(x for x in (f"`{t['install']}`" if t["install"] else "",
                                       f"({t['install_note']})" if t["install"] and t["install_note"] else
                                       t["install_note"] or "") if x)
        runs = f"**{t['runs']}**" if t["runs"] == "yes" else t["runs"]
        why = t["why"] + (f" ({{doc}}`{t['chapter']}`)" if t["chapter"] else "")
        cells = ([t["stage"].capitalize()] if stage is None else []) + [name, t["what"], install, runs + (f": {why}" if why else "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
