"""The data every row trains on: tokenized and packed once, saved in the work directory, loaded
by each row; and the same data in the forms TRL takes (packed rows with `seq_lengths`, `messages`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

from benchmark_plan import Settings
from mft_trainer import DataConfig, TaskRegistry, build_mft_dataset
from mft_trainer.packing import pack_dataset


def task_dirs(data: str) -> list[str]:
    """The task directories of `data` (one directory of jsonl files per task)."""
    paths = sorted(str(p) for p in Path(data).iterdir() if p.is_dir())
    if not paths:
        raise ValueError(f"{data} has no task directory (expected one directory of jsonl files per task)")
    return paths


def prepare_data(s: Settings) -> dict[str, Any]:
    """Tokenize the data once (samples), pack it (rows), and save both in the work directory for the
    rows to load: every row then trains on exactly these tokens."""
    tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
    config = DataConfig(data_paths=task_dirs(s.data), seq_length=s.seq_length, data_split=s.data_split,
                        skip_invalid_records=True, empty_answers="invalid", dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)
    if data.valid is None:
        raise ValueError(f"data_split {s.data_split} leaves no validation sample; the CoBa row needs some")
    rows, packing = pack_dataset(data.train, s.seq_length, config.split_seed, "train")
    valid_rows, _ = pack_dataset(data.valid, s.seq_length, config.split_seed, "valid")
    work = Path(s.workdir)
    for name, dataset in (("samples", data.train), ("rows", rows), ("valid_rows", valid_rows)):
        dataset.save_to_disk(str(work / name))
    data.tasks.save(work)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    return {
        "samples": len(data.train),
        "sample_tokens": sum(lengths),
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
        "longest_sample": max(lengths),
        "rows": packing.rows,
        "row_efficiency": round(packing.efficiency, 4),
        "valid_samples": len(data.valid),
        "skipped_invalid": data.summary.total.skipped_invalid,
        "dropped_too_long": data.summary.total.dropped_too_long,
    }


def load_data(s: Settings) -> dict[str, Any]:
    """What `prepare_data` saved: the samples, the packed rows, the validation rows and the tasks."""
    work = Path(s.workdir)
    out: dict[str, Any] = {name: load_from_disk(str(work / name)) for name in ("samples", "rows", "valid_rows")}
    out["tasks"] = TaskRegistry.load(work)
    return out


def with_seq_lengths(rows: Dataset) -> Dataset:
    """Our packed rows as TRL's packed rows: input_ids, labels and `seq_lengths` (the samples of
    each row, where position_ids restart at 0), which TRL's padding-free collator turns into
    position_ids and cu_seq_lens."""

    def lengths(row: dict[str, Any]) -> dict[str, Any]:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        return {"seq_lengths": [b - a for a, b in zip(starts, starts[1:])]}

    return rows.map(lengths).select_columns(["input_ids", "labels", "seq_lengths"])


def trl_messages(data: str) -> tuple[list[dict[str, Any]], int]:
    """The conversations of every task as TRL `messages` (roles system/user/assistant), and how many
    records were left out because the chat template would reject them (an empty turn)."""
    roles = {"system": "system", "human": "user", "user": "user", "bot": "assistant", "assistant": "assistant",
             "gpt": "assistant"}
    conversations, skipped = [], 0
    for task in task_dirs(data):
        for path in sorted(Path(task).rglob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                turns = json.loads(line).get("chat_rounds") or []
                messages = [{"role": roles.get(str(t.get("role", "")).lower(), ""), "content": t.get("content")}
                            for t in turns]
                if not messages or any(not m["role"] or not isinstance(m["content"], str) or not m["content"].strip()
                                       for m in messages):
                    skipped += 1
                    continue
                conversations.append({"messages": messages})
    return conversations, skipped

