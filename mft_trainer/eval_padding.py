"""Evaluation on several ranks without counting any sample twice.

accelerate gives every rank the same number of full batches (each rank must run every forward:
DDP, ZeRO-3 and FSDP exchange data in it) by completing the last ones with samples from the start
of the set, which would then count twice in the per-task eval losses. `MFTTrainer` instead
completes the set with placeholders that carry no trained token, so they add nothing to any loss
or count, and keeps them last whatever the sampler, so that `gather_for_metrics` drops them from
the predictions as it drops repeated samples.

>>> samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1}] * 5
>>> padded = pad_for_even_batches(samples, 4)      # accelerate's global batch: 4
>>> len(padded), padded.total_dataset_length, padded[7]
(8, 5, {'input_ids': [5], 'labels': [-100], 'task_id': 1})
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .constants import IGNORE_INDEX


class PaddedDataset(torch.utils.data.Dataset):
    """`dataset` followed by `extra` copies of `placeholder`.

    `total_dataset_length` is the length without them: accelerate reads it to know how many items
    of the last gathered batch are real, so `gather_for_metrics` (the Trainer's predictions, hence
    `compute_metrics` and `predict`) drops the placeholders as it drops repeated samples. That holds
    while they come last, which `sampler_with_placeholders_last` keeps true for any sampler.
    """

    def __init__(self, dataset: Any, placeholder: dict[str, Any], extra: int):
        self.dataset, self.placeholder, self.extra = dataset, placeholder, extra
        self.total_dataset_length = len(dataset)

    def __len__(self) -> int:
        return self.total_dataset_length + self.extra

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index] if index < self.total_dataset_length else dict(self.placeholder)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Batched reads, as the DataLoader makes them (one Arrow read for a datasets.Dataset)."""
        real = [i for i in indices if i < self.total_dataset_length]
        read = getattr(self.dataset, "__getitems__", None)
        items = list(read(real)) if read is not None and real else [self.dataset[i] for i in real]
        return items + [dict(self.placeholder) for _ in range(len(indices) - len(real))]


class PlaceholdersLast(torch.utils.data.Sampler):
    """The indices of `sampler` (over the set without placeholders), then the placeholders'."""

    def __init__(self, sampler: Any, size: int, extra: int):
        self.sampler, self.size, self.extra = sampler, size, extra

    def __iter__(self) -> Iterator[int]:
        yield from self.sampler
        yield from range(self.size, self.size + self.extra)

    def __len__(self) -> int:
        return len(self.sampler) + self.extra


def sampler_with_placeholders_last(sampler_fn: Callable[[Any], Any], padded: PaddedDataset) -> Any:
    """The Trainer's eval sampler over the set itself (a length-grouped one reads its lengths), with
    the placeholders after it; None (sequential order) stays None."""
    sampler = sampler_fn(padded.dataset)
    return None if sampler is None else PlaceholdersLast(sampler, padded.total_dataset_length, padded.extra)


def pad_for_even_batches(dataset: Any, multiple: int) -> Any:
    """`dataset` with items appended up to a multiple of `multiple` (accelerate's global batch), each a
    one-token copy of the first item with no trained token, so it adds nothing to any loss or count.

    accelerate gives every rank the same number of full batches (each rank must run every forward:
    DDP, ZeRO-3 and FSDP exchange data in it) by completing the last ones with samples from the start
    of the set; these placeholders take their place. A set that already divides evenly, has no length
    (an IterableDataset) or is empty is returned as it is.
    """
    if multiple <= 1 or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return dataset
    size = len(dataset)
    extra = -size % multiple
    if size == 0 or extra == 0:
        return dataset
    first = dataset[0]
    if not isinstance(first, dict) or "labels" not in first:
        return dataset
    placeholder = {}
    for key, value in first.items():
        # Lists, tensors and numpy arrays with a token axis (a 0-d task_id is not one).
        if (isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0) and len(value) > 0:
            value = value[:1]  # every per-token field keeps one token
        placeholder[key] = value
    labels = placeholder["labels"]
    if isinstance(labels, torch.Tensor):
        placeholder["labels"] = torch.full_like(labels, IGNORE_INDEX)
    elif isinstance(labels, np.ndarray):
        placeholder["labels"] = np.full_like(labels, IGNORE_INDEX)
    else:
        placeholder["labels"] = [IGNORE_INDEX]
    return PaddedDataset(dataset, placeholder, extra)


def pad_eval_set_for_ranks(
    dataset: Any, global_batch: int, sampler_fn: Callable[[Any], Any] | None
) -> tuple[Any, Callable[[Any], Any] | None]:
    """The evaluation set and sampler function to give the Trainer's dataloader on several ranks:
    `pad_for_even_batches(dataset, global_batch)`, and `sampler_fn` wrapped so that the placeholders
    come last (both unchanged when the set needs no placeholder).

    >>> dataset, sampler_fn = pad_eval_set_for_ranks(eval_set, 8, trainer._get_eval_sampler)   # doctest: +SKIP
    """
    padded = pad_for_even_batches(dataset, global_batch)
    if padded is dataset or sampler_fn is None:
        return padded, sampler_fn
    return padded, functools.partial(sampler_with_placeholders_last, sampler_fn)


def real_length(dataset: Any) -> int | None:
    """The number of real items of an evaluation set that may hold placeholders (None: not padded)."""
    return dataset.total_dataset_length if isinstance(dataset, PaddedDataset) else None
