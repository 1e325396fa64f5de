"""Reliability on the real model: repeatable numbers, interrupted training, the Colab setup path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

#: A fine-tune small enough for a test: 24 examples, the top layer only, 12 steps.
SMALL = {"layers": (29,), "epochs": 2, "batch_size": 2, "grad_accum": 2, "checkpoints": 3}


def _isolated_cache(tmp_path: Path) -> dict[str, str]:
    """An empty cache folder that shares only the converted base model (so nothing retrains it)."""
    from safetybook.models import base_snapshot

    snapshot = base_snapshot()
    (tmp_path / "base").mkdir(parents=True)
    (tmp_path / "base" / snapshot.name).symlink_to(snapshot)
    return {**os.environ, "SAFETYBOOK_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


TRAIN = textwrap.dedent(
    f"""
    import sys
    from safetybook.adapters import REFUSALS, Example, ensure_adapter, with_settings
    from safetybook.data import prompts

    examples = [Example(p, REFUSALS[0], "harmful") for p in prompts("harmful", "train")[:12]]
    examples += [Example(p, "Sure. Here is a short answer.", "harmless") for p in prompts("harmless", "train")[:12]]
    print(ensure_adapter(examples, with_settings(**{SMALL!r}), "small"), flush=True)
    """
)


def _train(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAIN], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_interrupted_training_leaves_no_adapter_and_the_next_run_trains(tmp_path):
    env = _isolated_cache(tmp_path)
    adapters = tmp_path / "adapters"
    proc = _train(env)
    deadline = time.time() + 300
    while not list(adapters.glob(".small-*.tmp/checkpoints/step-*.safetensors")):  # mid-way: a checkpoint exists
        assert proc.poll() is None, f"training ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no checkpoint appeared within 5 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in adapters.iterdir() if p.name.startswith("small-")], "a killed run left an adapter in place"
    assert list(adapters.glob(".small-*.tmp")), "expected the killed run's temporary folder"

    proc = _train(env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    folder = Path(out.strip().splitlines()[-1])
    assert (folder / "adapter_model.safetensors").stat().st_size > 0
    assert len(list((folder / "checkpoints").glob("step-*.safetensors"))) == SMALL["checkpoints"]
    assert not list(adapters.glob(".small-*.tmp")), "the retry should clear the stale temporary folder"


def test_two_runs_give_the_same_adapter_and_the_same_scores(tmp_path):
    """Training, scoring and the probe repeat exactly: the book's numbers do not drift between builds."""
    script = TRAIN + textwrap.dedent(
        """
        import hashlib, json
        from pathlib import Path
        from safetybook.adapters import merged_model
        from safetybook.directions import fit_probe, last_token_activations
        from safetybook.zoo import load_model
        from safetybook.refusal import refusal_score

        folder = Path(ensure_adapter(examples, with_settings(**SMALL_SETTINGS), "small"))
        weights = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        tok = load_model("base")[1]
        test = prompts("harmful", "test")[:6] + prompts("harmless", "test")[:6]
        model = merged_model(folder)
        scores = refusal_score(model, tok, test)
        acts = last_token_activations(model, tok, test, [20])[0]
        probe = fit_probe(20, acts[:6], acts[6:])
        print(json.dumps({"weights": weights, "scores": scores, "probe": probe.weight[:8] + [probe.bias]}))
        """
    ).replace("SMALL_SETTINGS", repr(SMALL))
    runs = []
    for i in range(2):
        env = _isolated_cache(tmp_path / f"run{i}")
        result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=900, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0]["weights"] == runs[1]["weights"], "two trainings from the same data gave different adapters"
    assert runs[0]["scores"] == runs[1]["scores"]
    assert runs[0]["probe"] == runs[1]["probe"]
    assert max(runs[0]["scores"]) > min(runs[0]["scores"]), "scores should vary across prompts"


def test_colab_setup_cell_works_from_a_bare_runtime(tmp_path):
    """The chapters' first cell, run where `safetybook` is not importable, clones the book (here from
    this checkout), installs what it pins, and makes the library importable from the clone."""
    cell = json.loads((ROOT / "chapters" / "00_start.ipynb").read_text())["cells"]
    setup = "".join(next(c for c in cell if c["cell_type"] == "code")["source"])
    clone = tmp_path / "book"
    script = textwrap.dedent(
        """
        import sys
        # A bare runtime: hide the editable install of safetybook (and the checkout) from imports.
        sys.meta_path[:] = [f for f in sys.meta_path if "safetybook" not in str(getattr(f, "__module__", "")).lower()]
        sys.path[:] = [p for p in sys.path if p not in ("", CHECKOUT)]
        import importlib.util
        assert importlib.util.find_spec("safetybook") is None, "safetybook still importable"
        """
    ).replace("CHECKOUT", repr(str(ROOT))) + setup + textwrap.dedent(
        """
        import os, safetybook
        from safetybook.data import prompts
        print(safetybook.__file__, os.getcwd(), len(prompts("harmful", "test")))
        """
    )
    env = {**os.environ, "SAFETYBOOK_CLONE": str(clone), "SAFETYBOOK_REPO": f"file://{ROOT}", "PIP_NO_INPUT": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    module, cwd, n = result.stdout.split()[-3:]
    assert Path(module).is_relative_to(clone), f"safetybook imported from {module}, not from the clone"
    assert Path(cwd) == clone / "chapters"
    assert int(n) > 0
