"""DataCollatorForMFT: dynamic padding, masks and per-token task/sample identity."""

import pytest
import torch

from mft_trainer import DataCollatorForMFT, DataConfig, build_mft_dataset


def test_padding_values_and_alignment():
    features = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "task_id": 2},
        {"input_ids": [9, 10], "labels": [-100, 10], "task_id": 0},
    ]
    batch = DataCollatorForMFT(pad_token_id=99)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids", "segment_ids"}
    assert all(t.dtype == torch.long and t.shape == (2, 4) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["task_ids"].tolist() == [[2, 2, 2, 2], [0, 0, -1, -1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0], [1, 1, -1, -1]]


def test_pad_to_multiple_of():
    batch = DataCollatorForMFT(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [1] * 9, "labels": [1] * 9, "task_id": 0}])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["labels"][0, 9:].eq(-100).all() and batch["attention_mask"][0, 9:].eq(0).all()


def test_rejects_missing_pad_and_misaligned_features():
    with pytest.raises(ValueError, match="eos_token_id"):
        DataCollatorForMFT(pad_token_id=None)
    with pytest.raises(ValueError, match="must align"):
        DataCollatorForMFT(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1], "task_id": 0}])


def test_collates_built_dataset_rows(tokenizer, example_task_dirs):
    data = build_mft_dataset(DataConfig(data_paths=example_task_dirs, dataset_cache_dir="none"), tokenizer)
    rows = [data.train[i] for i in (0, 50, 80, 95)]
    batch = DataCollatorForMFT(pad_token_id=tokenizer.eos_token_id)(rows)
    assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["task_ids"][i, :n].eq(row["task_id"]).all()
        # Every trained position carries its task id.
        trained = batch["labels"][i] != -100
        assert batch["task_ids"][i][trained].eq(row["task_id"]).all()


def test_batches_are_padded_with_the_pad_token_else_the_end_of_turn_else_eos():
    from types import SimpleNamespace

    from mft_trainer.segments import padding_token_id

    assert padding_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2), fallback=7) == 0  # 0 is a real id
    assert padding_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2), fallback=7) == 7
    assert padding_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        padding_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_the_padding_mode_of_rows_is_read_from_their_keys():
    from datasets import Dataset

    from mft_trainer.collator import rows_padding_mode

    sample = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1}
    row = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_ids": [1, 1, 0], "position_ids": [0, 1, 0]}
    for rows, mode in (([sample], "padding"), ([row], "pack")):
        assert rows_padding_mode(rows) == mode  # a list: its first row
        assert rows_padding_mode(Dataset.from_list(rows)) == mode  # a datasets.Dataset: its columns
        assert rows_padding_mode(Dataset.from_list(rows).to_iterable_dataset()) == mode
        DataCollatorForMFT(pad_token_id=0, padding_mode=mode)(rows)  # the mode that collates them
    assert rows_padding_mode([]) == rows_padding_mode(None) == "padding"
