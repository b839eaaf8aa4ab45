"""Packing at build time (pack, concat) and packed collation (pack, padding_free): nothing lost or
duplicated, deterministic by seed, exact batch contents, and the summary's efficiency."""

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from mft_trainer import DataCollatorForMFT, DataConfig, build_mft_dataset
from mft_trainer.packing import best_fit_decreasing, concat_pieces

from .helpers import write_jsonl


def build(paths, **kwargs):
    kwargs.setdefault("dataset_cache_dir", "none")
    return DataConfig(data_paths=paths, **kwargs)


def packed_examples(tokenizer, example_task_dirs, **kwargs):
    """The bundled example tasks, packed into rows of 512 tokens, with an 80/20 split."""
    config = build(example_task_dirs, data_split="80,20", seq_length=512, padding_mode="pack", **kwargs)
    return build_mft_dataset(config, tokenizer)


def segments_of_rows(rows) -> list[tuple[int, tuple, tuple]]:
    """Cut packed rows (dicts of per-token lists) at position 0: (task, input_ids, labels) per segment."""
    out = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts[:-1], starts[1:]):
            tasks = set(row["task_ids"][a:b])
            assert len(tasks) == 1, "a segment holds tokens of one task"
            assert row["position_ids"][a:b] == list(range(b - a))
            out.append((tasks.pop(), tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])))
    return out


def samples_of(dataset) -> list[tuple[int, tuple, tuple]]:
    return [(r["task_id"], tuple(r["input_ids"]), tuple(r["labels"])) for r in dataset]


# ------------------------------------------------------------------------------ best-fit decreasing


def test_best_fit_decreasing_by_hand():
    # Decreasing: 6 (item 4) opens row 0 (2 free), 5 opens row 1 (3 free), 4 opens row 2 (4 free),
    # 3 fits rows 1 and 2 and goes to the fuller row 1, 2 fits rows 0 and 2 and goes to row 0.
    assert best_fit_decreasing([5, 3, 4, 2, 6], capacity=8, seed=0) == [[4, 3], [0, 1], [2]]


def test_best_fit_decreasing_places_every_item_once_and_fills_rows():
    lengths = torch.randint(1, 300, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = best_fit_decreasing(lengths, capacity=1024, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (len(bins) * 1024) > 0.99  # short items: rows nearly full
    # Best fit never leaves two rows that could be merged.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert loads[0] + loads[1] > 1024


def test_best_fit_decreasing_is_deterministic_by_seed():
    lengths = [3, 3, 3, 3, 2, 2, 2, 1, 1] * 5
    assert best_fit_decreasing(lengths, 8, seed=3) == best_fit_decreasing(lengths, 8, seed=3)
    assert best_fit_decreasing(lengths, 8, seed=3) != best_fit_decreasing(lengths, 8, seed=4)


def test_best_fit_decreasing_rejects_items_that_do_not_fit():
    with pytest.raises(ValueError, match="item 1 of length 9 into rows of 8"):
        best_fit_decreasing([2, 9], capacity=8, seed=0)


def test_concat_pieces_cut_the_stream_into_full_rows():
    lengths = [5, 12, 3, 7]
    rows = concat_pieces(lengths, seq_length=8, seed=0)
    assert [sum(p.end - p.start for p in row) for row in rows] == [8, 8, 8, 3]
    covered = Counter()
    for row in rows:
        for piece in row:
            covered.update((piece.sample, t) for t in range(piece.start, piece.end))
    assert covered == Counter((s, t) for s, n in enumerate(lengths) for t in range(n))  # each token once


# ------------------------------------------------------------------------------ dataset build


def test_pack_keeps_every_sample_once_and_is_deterministic(tokenizer, example_task_dirs):
    plain = build_mft_dataset(build(example_task_dirs, data_split="80,20", seq_length=512), tokenizer)
    packed = packed_examples(tokenizer, example_task_dirs)
    assert packed.padding_mode == "pack"
    assert packed.train.column_names == ["input_ids", "labels", "task_ids", "position_ids"]
    for split in ("train", "valid"):
        rows = list(getattr(packed, split))
        assert all(len(r["input_ids"]) <= 512 for r in rows)
        assert len(rows) < len(getattr(plain, split)) / 3  # several samples per row
        # Validation samples never share a row with training samples: each split packs its own.
        assert Counter(segments_of_rows(rows)) == Counter(samples_of(getattr(plain, split)))

    again = packed_examples(tokenizer, example_task_dirs)
    assert again.train.to_list() == packed.train.to_list()
    other_seed = packed_examples(tokenizer, example_task_dirs, split_seed=7)
    assert other_seed.train.to_list() != packed.train.to_list()


def test_pack_summary_reports_efficiency(tokenizer, example_task_dirs):
    data = packed_examples(tokenizer, example_task_dirs)
    train, valid = data.summary.packing
    assert (train.split, valid.split) == ("train", "valid")
    assert train.rows == len(data.train) and train.samples == data.summary.total.train_samples
    assert train.tokens == sum(len(r["input_ids"]) for r in data.train)
    assert train.efficiency == pytest.approx(train.tokens / (train.rows * 512))
    assert 0.9 < train.efficiency <= 1.0
    text = str(data.summary)
    assert "padding_mode pack" in text and f"({100 * train.efficiency:.1f}% efficiency)" in text
    assert data.summary.to_dict()["packing"][0]["efficiency"] == pytest.approx(train.efficiency)
    assert build_mft_dataset(build(example_task_dirs), tokenizer).summary.packing == []


def test_pack_rows_are_cached_and_reused(tmp_path, tokenizer, example_task_dirs):
    config = build(example_task_dirs, seq_length=512, padding_mode="pack", dataset_cache_dir=str(tmp_path))
    first = build_mft_dataset(config, tokenizer)
    row_files = sorted(p.name for p in tmp_path.glob("rows-*.arrow"))
    assert len(row_files) == 2  # train and valid
    second = build_mft_dataset(config, tokenizer)
    assert sorted(p.name for p in tmp_path.glob("rows-*.arrow")) == row_files
    assert second.train.to_list() == first.train.to_list()


def test_concat_splits_long_documents_and_restarts_positions(tmp_path, tokenizer):
    # Three text documents of 30, 5 and 20 tokens (with the trailing "\n" and EOS).
    docs = ["a" + " a" * 27, "b b b", "c" + " c" * 17]
    path = write_jsonl(tmp_path / "pretrain" / "x.jsonl", [{"text": d} for d in docs])
    config = build([str(path.parent)], data_split="100,0", seq_length=16, padding_mode="concat")
    data = build_mft_dataset(config, tokenizer)
    rows = list(data.train)
    assert [len(r["input_ids"]) for r in rows] == [16, 16, 16, 7]  # 55 tokens; nothing dropped as too long
    assert data.summary.task("pretrain").dropped_too_long == 0
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0  # a row always starts a segment, also mid-document
        assert all(row["labels"][i] == -100 for i in starts)  # never predicted across a boundary
    # The rows, read in order, are the documents one after the other (in a seeded order), each whole.
    stream = [t for row in rows for t in row["input_ids"]]
    tokens = [tokenizer.encode(d + "\n") + [tokenizer.eos_token_id] for d in docs]
    assert any(stream == [t for i in order for t in tokens[i]] for order in itertools.permutations(range(3)))
    packing = data.summary.packing[0]
    assert (packing.samples, packing.rows, packing.tokens) == (3, 4, 55)
    assert packing.segments > packing.samples  # documents continued in the next row
    assert "continued in the next row" in str(data.summary)


def test_padding_mode_is_validated():
    accepted = "padding, pack, padding_free, concat"
    with pytest.raises(ValueError, match=rf"padding_mode must be one of {accepted}"):
        DataConfig(data_paths=["x"], padding_mode="packed")


# ------------------------------------------------------------------------------ collation


ROWS = [
    # Two samples of tasks 2 and 0 in one row, then a row with one sample of task 1.
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "task_ids": [2, 2, 2, 0, 0],
     "position_ids": [0, 1, 2, 0, 1]},
    {"input_ids": [3, 4, 5], "labels": [-100, 4, 5], "task_ids": [1, 1, 1], "position_ids": [0, 1, 2]},
]


def test_pack_collator_exact_batch():
    batch = DataCollatorForMFT(pad_token_id=0, padding_mode="pack")(ROWS)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, 5, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]  # the padding is a segment
    assert batch["task_ids"].tolist() == [[2, 2, 2, 0, 0], [1, 1, 1, -1, -1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, -1, -1]]
    # Boundaries over the 10 flattened tokens, the padding tail included, for varlen kernels.
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 8, 10]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3


def test_pack_collator_masks_the_first_label_of_every_segment():
    row = dict(ROWS[0], labels=[5, 6, 7, 8, 9])  # a hand-made row that trains segment starts
    batch = DataCollatorForMFT(pad_token_id=0, padding_mode="pack")([row])
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_padding_free_collator_flattens_samples_into_one_row():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1},
        {"input_ids": [8, 9], "labels": [-100, 9], "task_id": 0},
        {"input_ids": [4], "labels": [-100], "task_id": 1},
    ]
    batch = DataCollatorForMFT(pad_token_id=0, padding_mode="padding_free", pad_to_multiple_of=8)(samples)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert batch["task_ids"].tolist() == [[1, 1, 1, 0, 0, 1, -1, -1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, -1, -1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8] and batch["max_length_q"] == 3


def test_padding_free_collator_joins_packed_rows_too():
    batch = DataCollatorForMFT(pad_token_id=0, padding_mode="padding_free")(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 5]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]


def test_collator_errors_name_the_fix():
    with pytest.raises(ValueError, match="padding_mode='pack'"):
        DataCollatorForMFT(pad_token_id=0)(ROWS)  # packed rows through the padding collator
    bad = dict(ROWS[0], position_ids=[0, 1, 2, 4, 5])
    with pytest.raises(ValueError, match=r"feature 0 has position_ids .* \(token 3: 2 -> 4\)"):
        DataCollatorForMFT(pad_token_id=0, padding_mode="pack")([bad])
    with pytest.raises(ValueError, match="must align"):
        DataCollatorForMFT(pad_token_id=0, padding_mode="pack")([dict(ROWS[0], task_ids=[1])])
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        DataCollatorForMFT(pad_token_id=0, padding_mode="flat")


@pytest.mark.parametrize("mode", ["pack", "padding_free"])
def test_an_epoch_sees_every_sample_exactly_once(tokenizer, example_task_dirs, mode):
    """Through a shuffling DataLoader, as the Trainer iterates: the segments of an epoch are the samples."""
    plain = build_mft_dataset(build(example_task_dirs, seq_length=512), tokenizer)
    data = build_mft_dataset(build(example_task_dirs, seq_length=512, padding_mode=mode), tokenizer)
    assert data.collator(0).padding_mode == mode
    loader = DataLoader(data.train, batch_size=4, collate_fn=data.collator(pad_token_id=0),
                        sampler=RandomSampler(data.train, generator=torch.Generator().manual_seed(0)))
    seen = []
    for batch in loader:
        for segment in batch["segment_ids"].unique().tolist():
            if segment < 0:
                continue
            at = batch["segment_ids"] == segment
            assert batch["task_ids"][at].unique().numel() == 1
            seen.append((int(batch["task_ids"][at][0]), tuple(batch["input_ids"][at].tolist())))
    assert Counter(seen) == Counter((task, ids) for task, ids, _ in samples_of(plain.train))
