"""Train/validation split of each task, deterministic by seed.

>>> parse_data_split("98,2,0")
(0.98, 0.02)
>>> split_indices(10, 0.2, seed=42, task="code_qa")  # doctest: +SKIP
([0, 1, 2, 4, 5, 6, 8, 9], [3, 7])
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np


def parse_data_split(value: str | Sequence[float]) -> tuple[float, float]:
    """Parse MFTCoder's "train,valid[,test]" weights (e.g. "98,2,0") into (train, valid) fractions.

    Raises:
        ValueError: not two or three non-negative numbers, a zero train part, or a non-zero test part.
    """
    expected = 'expected "train,valid" or MFTCoder\'s "train,valid,test" weights, e.g. "98,2" or "98,2,0"'
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        weights = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"data_split {value!r} is not a list of numbers; {expected}") from None
    if len(weights) not in (2, 3) or any(w < 0 for w in weights) or weights[0] <= 0:
        raise ValueError(f"data_split {value!r} is invalid; {expected}")
    if len(weights) == 3 and weights[2] > 0:
        raise ValueError(
            f"data_split {value!r} asks for a test part, which training does not use; set it to 0 and keep "
            "test data in separate files"
        )
    total = weights[0] + weights[1]
    return weights[0] / total, weights[1] / total


def split_indices(num_samples: int, valid_fraction: float, seed: int, task: str) -> tuple[list[int], list[int]]:
    """Split 0..num_samples-1 into sorted (train, valid) index lists.

    The permutation depends only on the seed and the task name, so adding or removing another task
    does not change this task's split. The validation part is rounded up, so that every task with
    two samples or more is evaluated; at least one sample always stays in train.
    """
    num_valid = min(math.ceil(num_samples * valid_fraction - 1e-9), max(num_samples - 1, 0))
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    permutation = rng.permutation(num_samples)
    return sorted(permutation[num_valid:].tolist()), sorted(permutation[:num_valid].tolist())
