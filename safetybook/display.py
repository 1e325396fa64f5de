"""How the book shows model output: harmful completions only ever truncated."""
from __future__ import annotations

TRUNCATE_WORDS = 6


def truncate(text: str, words: int = TRUNCATE_WORDS) -> str:
    """The first few words of a completion, marked as cut: the only way the book shows
    an answer to a harmful prompt."""
    parts = text.split()
    if len(parts) <= words:
        return " ".join(parts)
    return " ".join(parts[:words]) + " […]"
