"""Helpers for writing test data."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows to `path`: dicts are dumped as JSON, strings are written as raw lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def chat(*turns: tuple[str, str]) -> dict:
    """A chat_rounds record from (role, content) pairs."""
    return {"chat_rounds": [{"role": role, "content": content} for role, content in turns]}
