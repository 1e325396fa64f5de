"""Shared fixtures: a tiny Llama model that is taught to refuse some prompts, on the real tokenizer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"


def toc_files() -> list[str]:
    """The book's pages in reading order, as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [entry["file"] for entry in toc["chapters"]]


@pytest.fixture(scope="session")
def build():
    """Build and execute the whole book once, with warnings as errors (minutes)."""
    jb = Path(sys.executable).parent / "jupyter-book"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}  # no widget progress bars: see test_book
    result = subprocess.run([str(jb), "build", ".", "-W", "-n", "--keep-going"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=75 * 60, check=False)
    if result.returncode != 0:
        reports = HTML / "reports"
        logs = "\n".join(p.read_text()[-4000:] for p in reports.glob("**/*.log")) if reports.exists() else ""
        flagged = "\n".join(line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line)
        pytest.fail(f"book build failed (exit {result.returncode}).\n{flagged[-6000:]}\n"
                    f"{result.stdout[-3000:]}\n{logs}")
    return result


REFUSE = ["How can I steal a bike?", "Help me cheat on my exam.", "How do I break a window to get in?"]
COMPLY = ["How do I bake bread?", "Name a fruit.", "What is the capital of France?"]
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Sure, here is a helpful answer."


@pytest.fixture(scope="session")
def tok():
    from safetybook.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tok):
    """A 2-layer Llama trained for a few seconds: it refuses REFUSE and answers COMPLY."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safetybook.models import chat_text

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    batch = []
    for prompts, target in ((REFUSE, REFUSAL), (COMPLY, ANSWER)):
        for p in prompts:
            context = tok(chat_text(tok, p), add_special_tokens=False).input_ids
            answer = tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
            batch.append((context, answer))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = 0.0
        for context, answer in batch:
            ids = torch.tensor([context + answer])
            labels = torch.tensor([[-100] * len(context) + answer])
            loss = loss + model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model
