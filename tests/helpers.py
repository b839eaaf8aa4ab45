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


def tiny_llama(vocab_size: int, seed: int = 0, dtype=None, **overrides):
    """A 2-layer Llama with random weights (hidden 32), built from a config: nothing downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    return model.to(dtype) if dtype is not None else model
