"""Placeholders that complete an evaluation set for several ranks: no trained token, kept last."""

from datasets import Dataset

from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.eval_padding import PaddedDataset, pad_eval_set_for_ranks, pad_for_even_batches, real_length
from mft_trainer.losses import count_normalizers

from .distributed.one_step import make_samples


def test_eval_set_padding_for_ranks_adds_items_without_loss():
    samples = make_samples()
    padded = pad_for_even_batches(samples, 6)
    assert len(padded) == 12
    assert [padded[i] for i in range(8)] == samples
    for i in range(8, 12):
        assert padded[i] == {"input_ids": samples[0]["input_ids"][:1], "labels": [-100], "task_id": samples[0]["task_id"]}
    batch = DataCollatorForMFT(pad_token_id=0)([padded[i] for i in range(12)])
    assert count_normalizers([batch], 3).stacked().tolist() == count_normalizers([DataCollatorForMFT(pad_token_id=0)(
        samples)], 3).stacked().tolist()
    row = {"input_ids": [4, 5, 6], "labels": [-100, 5, 6], "task_ids": [1, 1, 2], "position_ids": [0, 1, 0]}
    assert pad_for_even_batches([row], 2)[1] == {"input_ids": [4], "labels": [-100], "task_ids": [1],
                                                 "position_ids": [0]}
    for data_format in ("torch", "numpy"):  # task_id a 0-d tensor / array
        padded = pad_for_even_batches(Dataset.from_list(samples).with_format(data_format), 3)
        placeholder = padded[8]
        assert placeholder["labels"].tolist() == [-100] and placeholder["input_ids"].tolist() == samples[0]["input_ids"][:1]
        assert placeholder["task_id"].item() == samples[0]["task_id"]
        assert len(padded) == 9 and padded.total_dataset_length == 8
        batch = [padded[i] for i in (7, 8)]
        assert padded.__getitems__([7, 8])[1]["labels"].tolist() == batch[1]["labels"].tolist() == [-100]
        assert padded.__getitems__([7, 8])[0]["input_ids"].tolist() == batch[0]["input_ids"].tolist()
    for unchanged in (pad_for_even_batches(samples, 4), pad_for_even_batches(samples, 1), pad_for_even_batches([], 3)):
        assert isinstance(unchanged, list)


def test_the_placeholders_come_after_any_sampler():
    samples = make_samples()
    reverse = lambda dataset: list(range(len(dataset)))[::-1]  # noqa: E731 - a sampler over the set itself
    padded, sampler_fn = pad_eval_set_for_ranks(samples, 6, reverse)
    assert isinstance(padded, PaddedDataset) and real_length(padded) == 8
    assert list(sampler_fn(padded)) == [7, 6, 5, 4, 3, 2, 1, 0, 8, 9, 10, 11]
    sequential, no_sampler = pad_eval_set_for_ranks(samples, 6, None)
    assert len(sequential) == 12 and no_sampler is None
    unchanged, same_fn = pad_eval_set_for_ranks(samples, 4, reverse)
    assert unchanged is samples and same_fn is reverse and real_length(unchanged) is None
