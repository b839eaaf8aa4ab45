"""`DataCollatorForMFT`: samples -> a padded batch that carries task and sample identity per token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .constants import IGNORE_INDEX, NO_TASK


@dataclass
class DataCollatorForMFT:
    """Pad samples to the longest of the batch (right padding) and label every token with its task
    and its sample.

    Each feature is a mapping with `input_ids`, `labels` (-100 where no loss) and `task_id` (an int).
    The batch holds, all `[B, L]`:

    - `input_ids`, padded with `pad_token_id`;
    - `attention_mask`, 1 on real tokens;
    - `labels`, -100 on padding and on untrained positions;
    - `task_ids`, the task of each token (-1 on padding), aligned with `labels`;
    - `segment_ids`, the sample of each token, numbered 0..B-1 within the batch (-1 on padding).
      Packed rows hold several samples, so the sample-mean losses count samples by segment, never
      by row.

    Args:
        pad_token_id: the id used for padding (its value never matters: padding is masked out and
            carries no loss). For a tokenizer without a pad token, pass its EOS id.
        pad_to_multiple_of: pad the length up to a multiple of this (e.g. 8 for tensor cores).

    >>> collator = DataCollatorForMFT(pad_token_id=0)
    >>> batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1},
    ...                   {"input_ids": [8, 9], "labels": [-100, 9], "task_id": 0}])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]])
    >>> batch["labels"].tolist()
    [[-100, 6, 7], [-100, 9, -100]]
    >>> batch["task_ids"].tolist(), batch["segment_ids"].tolist()
    ([[1, 1, 1], [0, 0, -1]], [[0, 0, 0], [1, 1, -1]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer has no pad token; pass tokenizer.eos_token_id "
                "(padding is masked out, so any id works)"
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForMFT got an empty list of features")
        lengths = [len(f["input_ids"]) for f in features]
        max_length = max(lengths)
        if self.pad_to_multiple_of:
            max_length = -(-max_length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch_size = len(features)
        input_ids = torch.full((batch_size, max_length), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((batch_size, max_length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((batch_size, max_length), dtype=torch.long)  # [B, L]
        task_ids = torch.full((batch_size, max_length), NO_TASK, dtype=torch.long)  # [B, L]
        segment_ids = torch.full((batch_size, max_length), NO_TASK, dtype=torch.long)  # [B, L]
        for row, (feature, length) in enumerate(zip(features, lengths)):
            if len(feature["labels"]) != length:
                raise ValueError(
                    f"feature {row} has {length} input_ids but {len(feature['labels'])} labels; they must align"
                )
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
            task_ids[row, :length] = int(feature["task_id"])
            segment_ids[row, :length] = row
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "task_ids": task_ids,
            "segment_ids": segment_ids,
        }
