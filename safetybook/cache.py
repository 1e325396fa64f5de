"""Where the book keeps what it computes once (adapters, answers, probes), written atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cache_dir(*parts: str) -> Path:
    """The cache folder inside the checkout (``$SAFETYBOOK_CACHE`` overrides), created on demand."""
    base = Path(os.environ.get("SAFETYBOOK_CACHE", ROOT / ".cache"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(*objects: Any) -> str:
    """A short stable hash of JSON-serialisable objects: the key of a cache entry."""
    text = json.dumps(objects, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tensors(path: Path, tensors: dict) -> None:
    """Write named tensors as safetensors (never pickle) to a temporary file, then rename it into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: Path) -> dict | None:
    """The named tensors at ``path``, or None if it does not exist."""
    from safetensors.torch import load_file

    return load_file(path) if path.exists() else None


def read_json(path: Path) -> Any | None:
    """The JSON at ``path``, or None if it does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock named after ``path`` (other processes wait at the same call)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    If the block fails (or the process is killed), ``path`` is untouched and only a
    hidden ``.tmp`` folder is left, which the next call clears (call it under ``locked(path)``
    when several processes may write the same ``path``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def computing(what: str) -> Iterator[None]:
    """Say on stderr, in one line, that ``what`` was computed (not found in the cache) and how long
    it took. Stderr keeps the CLI's JSON output on stdout clean."""
    start = time.perf_counter()
    yield
    print(f"computed {what} in {time.perf_counter() - start:.0f} s (cached for next time)", file=sys.stderr, flush=True)
