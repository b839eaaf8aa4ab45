"""`DataCollatorForMFT`: samples (or packed rows) -> a batch that carries task and sample identity per token.

Two batch layouts, by `padding_mode` (docs/packing.md):

- `padding`: one sample per row, right-padded, with an `attention_mask`.
- packed (`pack`, `concat`, `padding_free`): rows hold several samples ("segments"). The batch has
  per-token `position_ids` restarting at 0 for every segment and no `attention_mask`, so that
  sdpa/eager/flex_attention build a block-causal mask from the position_ids; `cu_seq_lens_q/k` and
  `max_length_q/k` give the same boundaries to varlen kernels (flash_attention_2, torch_varlen).
  Padding at the end of a row is a segment of its own with no loss and no task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attention import cu_seq_lens_from_starts
from .constants import IGNORE_INDEX, NO_TASK
from .modes import PaddingMode


@dataclass
class DataCollatorForMFT:
    """Collate samples (or packed rows) into a batch and label every token with its task and sample.

    A feature is either a sample, a mapping with `input_ids`, `labels` (-100 where no loss) and
    `task_id` (an int), or a packed row (mft_trainer.packing) with per-token `input_ids`, `labels`,
    `task_ids` and `position_ids` (0 where each segment starts).

    With `padding_mode="padding"` (the default) features must be samples; the batch holds, all `[B, L]`:

    - `input_ids`, padded with `pad_token_id`;
    - `attention_mask`, 1 on real tokens;
    - `labels`, -100 on padding and on untrained positions;
    - `task_ids`, the task of each token (-1 on padding), aligned with `labels`;
    - `segment_ids`, the sample of each token, numbered 0..B-1 within the batch (-1 on padding).
      Packed rows hold several samples, so the sample-mean losses count samples by segment, never
      by row.

    With `padding_mode` "pack" or "concat" each feature (sample or packed row) is a row; with
    "padding_free" all features are joined into one row (`[1, total tokens]`). The batch then holds
    `input_ids`, `labels`, `task_ids`, `segment_ids` (numbered 0.. across the batch) and `position_ids`,
    all `[B, L]`; `cu_seq_lens_q` = `cu_seq_lens_k` (int32 `[S + 1]`, the segment boundaries over the
    flattened `B * L` tokens, padding included) and `max_length_q` = `max_length_k` (int); no
    `attention_mask`. The first label of every segment is -100: no token is predicted from another
    sample.

    Args:
        pad_token_id: the id used for padding (its value never matters: padding is masked out and
            carries no loss). For a tokenizer without a pad token, pass its EOS id.
        pad_to_multiple_of: pad the length up to a multiple of this (e.g. 8 for tensor cores).
        padding_mode: "padding", "pack", "concat" or "padding_free" (`MFTDataset.padding_mode`).

    >>> collator = DataCollatorForMFT(pad_token_id=0)
    >>> batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1},
    ...                   {"input_ids": [8, 9], "labels": [-100, 9], "task_id": 0}])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]])
    >>> batch["labels"].tolist()
    [[-100, 6, 7], [-100, 9, -100]]
    >>> batch["task_ids"].tolist(), batch["segment_ids"].tolist()
    ([[1, 1, 1], [0, 0, -1]], [[0, 0, 0], [1, 1, -1]])

    Padding-free, the same two samples in one row:

    >>> flat = DataCollatorForMFT(pad_token_id=0, padding_mode="padding_free")
    >>> batch = flat([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1},
    ...               {"input_ids": [8, 9], "labels": [-100, 9], "task_id": 0}])
    >>> batch["input_ids"].tolist(), batch["position_ids"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]])
    >>> batch["task_ids"].tolist(), batch["segment_ids"].tolist()
    ([[1, 1, 1, 0, 0]], [[0, 0, 0, 1, 1]])
    >>> batch["cu_seq_lens_q"].tolist(), batch["max_length_q"], "attention_mask" in batch
    ([0, 3, 5], 3, False)
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_mode: str = PaddingMode.PADDING.value

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer has no pad token; pass tokenizer.eos_token_id "
                "(padding is masked out, so any id works)"
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        self.padding_mode = PaddingMode.parse(self.padding_mode).value

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("DataCollatorForMFT got an empty list of features")
        if self.padding_mode == PaddingMode.PADDING.value:
            return self._padded(features)
        rows = [_as_row(feature, i) for i, feature in enumerate(features)]
        if self.padding_mode == PaddingMode.PADDING_FREE.value:
            rows = [{name: torch.cat([row[name] for row in rows]) for name in rows[0]}]
        return self._packed(rows)

    def _padded_length(self, longest: int) -> int:
        if self.pad_to_multiple_of:
            return -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return longest

    def _padded(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        max_length = self._padded_length(max(lengths))

        batch_size = len(features)
        input_ids = torch.full((batch_size, max_length), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((batch_size, max_length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((batch_size, max_length), dtype=torch.long)  # [B, L]
        task_ids = torch.full((batch_size, max_length), NO_TASK, dtype=torch.long)  # [B, L]
        segment_ids = torch.full((batch_size, max_length), NO_TASK, dtype=torch.long)  # [B, L]
        for row, (feature, length) in enumerate(zip(features, lengths)):
            if "task_id" not in feature:
                raise ValueError(
                    f"feature {row} has no task_id; it looks like a packed row (keys {sorted(feature)}): collate "
                    "packed rows with DataCollatorForMFT(padding_mode='pack'), e.g. data.collator(pad_token_id)"
                )
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

    def _packed(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        lengths = [len(row["input_ids"]) for row in rows]
        max_length = self._padded_length(max(lengths))
        batch_size = len(rows)
        input_ids = torch.full((batch_size, max_length), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((batch_size, max_length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        task_ids = torch.full((batch_size, max_length), NO_TASK, dtype=torch.long)  # [B, L]
        # Padding counts from 0 too, so that the tail of a row is a segment of its own.
        position_ids = torch.zeros((batch_size, max_length), dtype=torch.long)  # [B, L]
        is_real = torch.zeros((batch_size, max_length), dtype=torch.bool)  # [B, L]
        for r, (row, length) in enumerate(zip(rows, lengths)):
            input_ids[r, :length] = row["input_ids"]
            labels[r, :length] = row["labels"]
            task_ids[r, :length] = row["task_ids"]
            position_ids[r, :length] = row["position_ids"]
            position_ids[r, length:] = torch.arange(max_length - length)
            is_real[r, :length] = True

        starts = position_ids == 0  # [B, L], True where a segment (or a row's padding) starts
        # A segment's first token is never a target: the token before it belongs to another sample.
        labels[starts] = IGNORE_INDEX
        # Samples are numbered 0, 1, ... in batch order; padding tails get no number.
        sample = torch.cumsum((starts & is_real).reshape(-1), 0).reshape(batch_size, max_length) - 1  # [B, L]
        segment_ids = torch.where(is_real, sample, NO_TASK)  # [B, L]
        # Varlen kernels see the batch as B * L tokens in a row; each padding tail is a sequence too,
        # so that every token is computed (an uncovered token would be left uninitialised).
        cu_seq_lens = cu_seq_lens_from_starts(starts)  # [S + 1]
        longest = int(cu_seq_lens.diff().max())
        return {
            "input_ids": input_ids,
            "labels": labels,
            "task_ids": task_ids,
            "segment_ids": segment_ids,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }


def _as_row(feature: Mapping[str, Any], index: int) -> dict[str, torch.Tensor]:
    """A feature as a row of per-token tensors (a sample is a row with one segment), checked."""
    input_ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)  # [n]
    labels = torch.as_tensor(feature["labels"], dtype=torch.long)  # [n]
    n = len(input_ids)
    if n == 0:
        raise ValueError(f"feature {index} has no input_ids; every sample must have at least one token")
    if len(labels) != n:
        raise ValueError(f"feature {index} has {n} input_ids but {len(labels)} labels; they must align")
    if "position_ids" in feature:
        if "task_ids" not in feature:
            raise ValueError(f"feature {index} has position_ids but no per-token task_ids; packed rows need both")
        position_ids = torch.as_tensor(feature["position_ids"], dtype=torch.long)  # [n]
        task_ids = torch.as_tensor(feature["task_ids"], dtype=torch.long)  # [n]
        if len(position_ids) != n or len(task_ids) != n:
            raise ValueError(
                f"feature {index} has {n} input_ids, {len(position_ids)} position_ids and {len(task_ids)} task_ids; "
                "they must align"
            )
        # Positions count 0, 1, 2, ... within each segment: any other step would hide a boundary
        # (or invent one) and let samples see each other.
        previous = torch.cat([torch.tensor([-1]), position_ids[:-1]])
        bad = ~((position_ids == 0) | (position_ids == previous + 1))
        if bad.any():
            at = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"feature {index} has position_ids that neither restart at 0 nor count up by 1 (token {at}: "
                f"{int(previous[at])} -> {int(position_ids[at])}); packed rows need position_ids 0, 1, ... per sample"
            )
    else:
        position_ids = torch.arange(n)
        task_ids = torch.full((n,), int(feature["task_id"]), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "task_ids": task_ids, "position_ids": position_ids}


def rows_padding_mode(dataset: Any) -> PaddingMode:
    """The padding mode that collates the rows of `dataset`, read from its first row's keys: `pack`
    for packed rows (per-token `position_ids`, as build_mft_dataset writes them with padding_mode
    pack or concat), else `padding` (samples with a `task_id`). MFTTrainer builds its default
    collator with it when it is not handed the `MFTDataset` (whose `padding_mode` it then uses).

    Reading it from the rows is safe because the two layouts are told apart by the keys that the
    collator itself requires of them: a sample has a `task_id` and no `position_ids`, a packed row
    has `position_ids` and `task_ids`; `padding` refuses packed rows, and `pack` and `concat`
    collate rows alike, so there is no third case to tell. `padding_free` is a choice of collator,
    not of rows: pass `data_collator` for it. A set whose first row cannot be read (no
    `column_names`, no length, empty) is taken as samples; a packed row then fails in the collator,
    naming the fix.

    >>> rows_padding_mode([{"input_ids": [5, 6], "labels": [-100, 6], "task_id": 0}])
    <PaddingMode.PADDING: 'padding'>
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and len(dataset) > 0:
        first = dataset[0]
        columns = list(first) if isinstance(first, Mapping) else None
    return PaddingMode.PACK if columns is not None and "position_ids" in columns else PaddingMode.PADDING
