"""Lay samples out in rows of `seq_length`, once, when the dataset is built.

Two layouts (`DataConfig.padding_mode`):

- `pack`: whole samples, best-fit decreasing: samples in order of decreasing length (ties broken by a
  seeded permutation), each into the fullest row where it still fits, or into a new row. A sample is
  never split. On short SFT data this fills rows to ~99%.
- `concat` (continued pre-training): the samples, in a seeded random order, as one token stream cut
  into rows of exactly `seq_length` (the last one shorter). A document may span rows; the piece that
  continues it in the next row is a segment of its own.

A packed row has the columns `input_ids`, `labels`, `task_ids` (per token) and `position_ids`, which
restart at 0 where each segment starts: a segment starts exactly where `position_ids` is 0. The
first label of every segment is -100, so no token is ever predicted from another segment.

>>> best_fit_decreasing([5, 3, 4, 2, 6], capacity=8, seed=0)
[[4, 3], [0, 1], [2]]
>>> packed = pack_dataset(data.train, seq_length=2048, seed=42)          # doctest: +SKIP
>>> packed.column_names                                                   # doctest: +SKIP
['input_ids', 'labels', 'task_ids', 'position_ids']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence as SequenceFeature, Value
from datasets.fingerprint import Hasher

from .cache import cache_file_for
from .constants import IGNORE_INDEX
from .summary import PackingSummary
from .progress import SMALL_DATA_ROWS, data_progress_bars

# Bump when the packed layout changes, so that old cache files are not reused.
_PACK_FORMAT_VERSION = 1
PACKED_COLUMNS = ("input_ids", "labels", "task_ids", "position_ids")

_PACKED_FEATURES = Features({name: SequenceFeature(Value("int32")) for name in PACKED_COLUMNS})


@dataclass(frozen=True)
class Piece:
    """Tokens `start:end` of sample `sample`: one segment of a row."""

    sample: int
    start: int
    end: int


class _FreeSpaceIndex:
    """Open rows grouped by free space, with a segment tree over the free-space values, so that the
    fullest row that still fits a sample is found in O(log seq_length) instead of a scan of all rows."""

    def __init__(self, capacity: int):
        self.size = 1 << (capacity + 1).bit_length()  # leaves 0..size-1 cover free space 0..capacity
        self.counts = [0] * (2 * self.size)  # counts[node]: open rows whose free space is in node's range
        self.rows_by_space: list[list[int]] = [[] for _ in range(capacity + 1)]

    def _update(self, space: int, delta: int) -> None:
        node = space + self.size
        while node:
            self.counts[node] += delta
            node //= 2

    def add(self, space: int, row: int) -> None:
        self.rows_by_space[space].append(row)
        self._update(space, +1)

    def pop_fullest_fitting(self, need: int) -> tuple[int, int] | None:
        """Remove and return (free space, row) of a row with the least free space >= need, if any."""
        node = need + self.size
        if self.counts[node] == 0:
            # Climb until a right sibling holds a row: its subtree has the next larger free spaces.
            while node > 1 and not (node % 2 == 0 and self.counts[node + 1] > 0):
                node //= 2
            if node == 1:
                return None
            node += 1
            while node < self.size:  # descend to the smallest free space in that subtree
                node = 2 * node if self.counts[2 * node] > 0 else 2 * node + 1
        space = node - self.size
        row = self.rows_by_space[space].pop()
        self._update(space, -1)
        return space, row


def best_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Assign items to bins of `capacity` by best-fit decreasing.

    Args:
        lengths: the length of each item, each in 1..capacity.
        capacity: the size of a bin (seq_length).
        seed: breaks ties between items of equal length, so that the result depends on the seed only.
    Returns:
        The bins in the order they were opened, each the list of its item indices in placement order.
    Raises:
        ValueError: an item is empty or longer than a bin.
    """
    lengths = lengths.tolist() if isinstance(lengths, np.ndarray) else list(lengths)
    bad = [i for i, n in enumerate(lengths) if not 1 <= n <= capacity]
    if bad:
        raise ValueError(
            f"cannot pack item {bad[0]} of length {lengths[bad[0]]} into rows of {capacity} tokens "
            f"({len(bad)} such item(s)); every sample must have 1..seq_length tokens"
        )
    tiebreak = np.random.default_rng(seed).permutation(len(lengths))
    # By decreasing length, ties by the seeded permutation (numpy: a sort of Python tuples held ~150
    # bytes per sample).
    order = np.lexsort((tiebreak, -np.asarray(lengths, dtype=np.int64))).tolist()
    index = _FreeSpaceIndex(capacity)
    bins: list[list[int]] = []
    for item in order:
        found = index.pop_fullest_fitting(lengths[item])
        if found is None:
            space, row = capacity, len(bins)
            bins.append([])
        else:
            space, row = found
        bins[row].append(item)
        if space - lengths[item] > 0:
            index.add(space - lengths[item], row)
    return bins


def concat_pieces(lengths: Sequence[int], seq_length: int, seed: int) -> list[list[Piece]]:
    """Cut the samples, in a seeded random order, as one stream into rows of `seq_length` tokens.

    Returns:
        The rows, each the list of its pieces; every row but the last holds exactly seq_length tokens.
    """
    rows: list[list[Piece]] = [[]]
    free = seq_length
    for sample in np.random.default_rng(seed).permutation(len(lengths)).tolist():
        start = 0
        while start < lengths[sample]:
            if free == 0:
                rows.append([])
                free = seq_length
            end = min(lengths[sample], start + free)
            rows[-1].append(Piece(sample, start, end))
            free -= end - start
            start = end
    return [row for row in rows if row]


def _sample_lengths(dataset: Dataset) -> np.ndarray:
    """Token counts of every sample, read from Arrow a batch at a time (no Python lists). [N] int64."""
    chunks = [
        pc.list_value_length(batch["input_ids"]).to_numpy()
        for batch in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=10_000)
    ]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class _RowPlan:
    """Every row's pieces as flat arrays: row r holds pieces offsets[r]:offsets[r + 1], piece j being
    tokens starts[j]:ends[j] of sample samples[j]. (Arrays, not Piece objects: 1M samples as objects
    held ~150 MB.)"""

    offsets: np.ndarray  # [rows + 1]
    samples: np.ndarray  # [pieces]
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of_bins(cls, bins: list[list[int]], lengths: np.ndarray) -> _RowPlan:
        samples = np.fromiter((i for row in bins for i in row), dtype=np.int64, count=sum(len(row) for row in bins))
        offsets = np.concatenate([[0], np.cumsum([len(row) for row in bins])]).astype(np.int64)
        return cls(offsets, samples, np.zeros_like(samples), lengths[samples])

    @classmethod
    def of_pieces(cls, rows: list[list[Piece]]) -> _RowPlan:
        pieces = [p for row in rows for p in row]
        offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
        arrays = [np.array([getattr(p, name) for p in pieces], dtype=np.int64) for name in ("sample", "start", "end")]
        return cls(offsets, *arrays)

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    def table(self) -> pa.Table:
        offsets = pa.array(self.offsets, type=pa.int32())
        return pa.table({
            name: pa.ListArray.from_arrays(offsets, pa.array(values))
            for name, values in (("piece_sample", self.samples), ("piece_start", self.starts), ("piece_end", self.ends))
        })


class _RowBuilder:
    """The `datasets.map` function: a batch of row plans -> the packed rows."""

    def __init__(self, source: Dataset):
        self.source = source

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        wanted = sorted({s for samples in batch["piece_sample"] for s in samples})
        fetched = self.source[wanted]  # one read for the whole batch of rows
        position = {sample: i for i, sample in enumerate(wanted)}
        out: dict[str, list] = {name: [] for name in PACKED_COLUMNS}
        for samples, starts, ends in zip(batch["piece_sample"], batch["piece_start"], batch["piece_end"]):
            row: dict[str, list[int]] = {name: [] for name in PACKED_COLUMNS}
            for sample, start, end in zip(samples, starts, ends):
                i = position[sample]
                labels = list(fetched["labels"][i][start:end])
                # The first token of a segment is never a target: nothing before it in the row belongs
                # to its sample. (The renderer already does this for whole samples; concat's
                # continuation pieces need it here.)
                labels[0] = IGNORE_INDEX
                row["input_ids"] += fetched["input_ids"][i][start:end]
                row["labels"] += labels
                row["task_ids"] += [fetched["task_id"][i]] * (end - start)
                row["position_ids"] += range(end - start)
            for name in PACKED_COLUMNS:
                out[name].append(row[name])
        return out


def _build_rows(source: Dataset, plan: _RowPlan, fingerprint: str, cache_dir: Path | None, desc: str) -> Dataset:
    plans = Dataset(plan.table())
    cache_file = cache_file_for(cache_dir, f"rows-{fingerprint}.arrow")
    with data_progress_bars(len(source) >= SMALL_DATA_ROWS):  # samples laid out, not rows
        return plans.map(
            _RowBuilder(source),
            batched=True,
            # Rows are built as Python lists: 100 rows at a time (and written 100 at a time) keep that
            # to a few MB; 1000 held ~170 MB more at seq_length 1024.
            batch_size=100,
            writer_batch_size=100,
            remove_columns=plans.column_names,
            features=_PACKED_FEATURES,
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
            new_fingerprint=fingerprint,
            desc=desc,
        )


def _layout(
    dataset: Dataset, seq_length: int, seed: int, mode: str, split: str, cache_dir: Path | None
) -> tuple[Dataset, PackingSummary]:
    lengths = _sample_lengths(dataset)
    if mode == "pack":
        plan = _RowPlan.of_bins(best_fit_decreasing(lengths, seq_length, seed), lengths)
    else:
        plan = _RowPlan.of_pieces(concat_pieces(lengths.tolist(), seq_length, seed))
    # The source's fingerprint identifies its content (records, tokenizer, render settings, split).
    fingerprint = Hasher.hash([_PACK_FORMAT_VERSION, dataset._fingerprint, mode, seq_length, seed])
    packed = _build_rows(dataset, plan, fingerprint, cache_dir, desc=f"Laying out {split} rows ({mode})")
    summary = PackingSummary(
        split=split,
        rows=plan.rows,
        samples=len(lengths),
        segments=len(plan.samples),
        tokens=int(lengths.sum()),
        seq_length=seq_length,
    )
    return packed, summary


def pack_dataset(
    dataset: Dataset, seq_length: int, seed: int, split: str = "train", cache_dir: Path | None = None
) -> tuple[Dataset, PackingSummary]:
    """Pack whole samples (columns input_ids, labels, task_id) into rows of <= seq_length tokens by
    best-fit decreasing; deterministic by seed.

    Args:
        dataset: samples as built by `build_mft_dataset` with padding_mode "padding".
        seq_length: the row capacity; every sample must fit (the over-length policy ensures it).
        seed: orders samples of equal length.
        split: the name shown in progress bars and the summary.
        cache_dir: where to cache the rows (None: keep them in memory).
    Returns:
        The rows (columns input_ids, labels, task_ids, position_ids) and their PackingSummary.
    """
    return _layout(dataset, seq_length, seed, "pack", split, cache_dir)


def concat_dataset(
    dataset: Dataset, seq_length: int, seed: int, split: str = "train", cache_dir: Path | None = None
) -> tuple[Dataset, PackingSummary]:
    """Concatenate the samples in a seeded random order and cut the stream into rows of seq_length
    tokens (continued pre-training). Arguments and result as `pack_dataset`."""
    return _layout(dataset, seq_length, seed, "concat", split, cache_dir)
