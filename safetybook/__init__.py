"""safetybook: the small library behind *Interpretation for LLM Safety*.

Chapters import what more than one of them needs from here: loading the models, the prompt
sets, the refusal measurement, and the interventions.
"""
from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

#: The versions the book is built and tested with (see requirements.txt).
TESTED = {"torch": "2.13.0", "transformers": "5.24.0", "nnsight": "0.8.1", "peft": "0.21.2"}


def check_versions() -> list[str]:
    """Warn about installed packages whose versions differ from the tested ones; return them."""
    off = []
    for name, want in TESTED.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "not installed"
        if have.split("+")[0] != want:
            off.append(f"{name} {have} (tested: {want})")
    if off:
        warnings.warn(
            "safetybook was tested with other versions: " + "; ".join(off)
            + ". Results may differ; install requirements.txt to match the book.",
            stacklevel=2,
        )
    return off


check_versions()
