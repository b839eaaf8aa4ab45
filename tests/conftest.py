"""Shared fixtures: the real GPT-2 tokenizer bundled with the examples, and jsonl writers."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "data"
TOKENIZER_DIR = REPO / "examples" / "tokenizers" / "gpt2"
EXAMPLE_TASKS = ("code_generation", "code_qa", "multi_round_chat", "code_completion")


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture
def example_task_dirs() -> list[str]:
    return [str(EXAMPLE_DATA / task) for task in EXAMPLE_TASKS]

