"""The task mixture of the training set: how many samples of each task one epoch holds, and which.

`task_sampling` gives each task i a share p_i of an epoch, from n_i, its training samples:

- `proportional` (default): p_i ∝ n_i, every sample once, as without a mixture;
- `uniform`: every task the same share;
- `{temperature: T}`: p_i ∝ n_i^(1/T) (T = 1 is proportional; the larger T, the closer to uniform);
- `{weights: {task: w}}`: p_i ∝ w_i (tasks not named weigh 1).

An epoch holds as many samples as the tasks have, N = Σ n_i, task i k_i of them (p_i·N rounded
by largest remainder, so the k_i add up to N). `epoch_plan` realises this as a fixed, seeded list of
each task's samples: the task's samples in a seeded order, then again in another order, and so on,
cut after k_i. A down-sampled task (k_i < n_i) shows a seeded subset of its samples, without
repeats; an up-sampled one repeats a sample only after all of them were used. The plan is a
`datasets` selection made before packing, so packing, the exact loss across accumulation and
ranks, resume and the per-task summary work on it as on any dataset; each Trainer epoch goes
through the same planned samples, in a new order.

`max_samples` caps a task's records before anything else: a seeded subset of its valid records,
chosen before tokenization (`subset_indices`).

>>> rule = SamplingRule.parse("uniform")
>>> samples_per_epoch(rule, ["a", "b", "c"], [10, 30, 60])
[34, 33, 33]
>>> samples_per_epoch(SamplingRule.parse({"temperature": 2}), ["a", "b", "c"], [10, 30, 60])
[19, 34, 47]
>>> sorted(np.bincount(epoch_indices(3, 7, seed=0, task="a")).tolist())  # all twice before any third time
[2, 2, 3]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

_EXPECTED = (
    "expected 'proportional', 'uniform', {temperature: T} (T > 0) or {weights: {task_name: weight, ...}}"
)


class SamplingKind(str, Enum):
    PROPORTIONAL = "proportional"
    UNIFORM = "uniform"
    TEMPERATURE = "temperature"
    WEIGHTS = "weights"


@dataclass(frozen=True)
class SamplingRule:
    """A parsed `task_sampling` (module docstring)."""

    kind: SamplingKind = SamplingKind.PROPORTIONAL
    temperature: float = 1.0
    weights: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> SamplingRule:
        """Read `task_sampling`: a rule's name, or a mapping `{temperature: T}` or `{weights: {...}}`.

        Raises:
            ValueError: anything else, with the accepted forms.
        """
        if isinstance(value, SamplingRule):
            return value
        if isinstance(value, str) and value in (SamplingKind.PROPORTIONAL.value, SamplingKind.UNIFORM.value):
            return cls(SamplingKind(value))
        if isinstance(value, Mapping) and len(value) == 1:
            (key, setting), = value.items()
            if key == SamplingKind.TEMPERATURE.value:
                if isinstance(setting, bool) or not isinstance(setting, (int, float)) or not (
                    math.isfinite(setting) and setting > 0
                ):
                    raise ValueError(f"task_sampling temperature must be a number > 0, got {setting!r}")
                return cls(SamplingKind.TEMPERATURE, temperature=float(setting))
            if key == SamplingKind.WEIGHTS.value and isinstance(setting, Mapping) and setting:
                for name, weight in setting.items():
                    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                        math.isfinite(weight) and weight >= 0
                    ):
                        raise ValueError(f"task_sampling weight of {name!r} must be a number >= 0, got {weight!r}")
                if not any(weight > 0 for weight in setting.values()):
                    raise ValueError("task_sampling weights: at least one weight must be > 0")
                return cls(SamplingKind.WEIGHTS, weights={str(k): float(v) for k, v in setting.items()})
        if value == SamplingKind.TEMPERATURE.value:
            raise ValueError("task_sampling 'temperature' needs its value: {temperature: 2.0}")
        raise ValueError(f"task_sampling {value!r} is not a sampling rule; {_EXPECTED}")

    def check_tasks(self, names: Sequence[str]) -> None:
        """Raises ValueError when weights name a task that does not exist."""
        unknown = sorted(set(self.weights) - set(names))
        if unknown:
            raise ValueError(f"task_sampling weights name unknown task(s) {unknown}; the tasks are {list(names)}")

    def shares(self, names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
        """p_i of each task (they add up to 1). [K] float64."""
        sizes_ = np.asarray(sizes, dtype=np.float64)
        if self.kind is SamplingKind.PROPORTIONAL:
            raw = sizes_
        elif self.kind is SamplingKind.UNIFORM:
            raw = np.ones_like(sizes_)
        elif self.kind is SamplingKind.TEMPERATURE:
            raw = sizes_ ** (1.0 / self.temperature)
        else:
            raw = np.array([self.weights.get(name, 1.0) for name in names], dtype=np.float64)
        raw = np.where(sizes_ > 0, raw, 0.0)  # a task without samples cannot be drawn
        return raw / raw.sum()

    def __str__(self) -> str:
        if self.kind is SamplingKind.TEMPERATURE:
            return f"temperature {self.temperature:g}"
        if self.kind is SamplingKind.WEIGHTS:
            return "weights " + ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())
        return self.kind.value


def samples_per_epoch(rule: SamplingRule, names: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """k_i: the samples of each task in one epoch of N = Σ n_i samples (module docstring).

    The proportional rule keeps every task's n_i. Otherwise k_i is p_i·N rounded down, and the
    samples left go one each to the tasks with the largest remainders (the first task on ties).
    """
    if rule.kind is SamplingKind.PROPORTIONAL:
        return [int(n) for n in sizes]
    total = int(sum(sizes))
    exact = rule.shares(names, sizes) * total
    counts = np.floor(exact).astype(np.int64)
    left = total - int(counts.sum())
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts.tolist()


def _rng(seed: int, task: str, purpose: int) -> np.random.Generator:
    # The task's name, not its position: adding a task does not change another task's draws.
    return np.random.default_rng([seed, zlib.crc32(task.encode("utf-8")), purpose])


def epoch_indices(num_samples: int, count: int, seed: int, task: str) -> np.ndarray:
    """The positions (into the task's training samples) of the `count` samples of its epoch: seeded
    permutations of 0..num_samples-1 one after another, cut after `count`. [count] int64."""
    if count == 0 or num_samples == 0:
        return np.zeros(0, dtype=np.int64)
    rng = _rng(seed, task, 1)
    passes = -(-count // num_samples)
    return np.concatenate([rng.permutation(num_samples) for _ in range(passes)])[:count]


def identity_plan(num_samples: int, count: int) -> bool:
    """True when a task's epoch is its samples as they are (every one once): no selection needed."""
    return count == num_samples


def subset_indices(num_records: int, max_samples: int, seed: int, task: str) -> np.ndarray:
    """The sorted positions of a seeded subset of `max_samples` of `num_records` records (all of them
    when there are no more). [min(num_records, max_samples)] int64."""
    if max_samples >= num_records:
        return np.arange(num_records)
    return np.sort(_rng(seed, task, 2).choice(num_records, size=max_samples, replace=False))


def parse_max_samples(value: Any) -> int | dict[str, int] | None:
    """`max_samples`: None, an integer >= 1 for every task, or a mapping {task_name: integer >= 1}.

    Raises:
        ValueError: anything else.
    """
    def check(number: Any, where: str) -> int:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{where} must be an integer >= 1, got {number!r}")
        return number

    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("max_samples is an empty mapping; give {task_name: count} or one count for all tasks")
        return {str(name): check(number, f"max_samples[{name!r}]") for name, number in value.items()}
    return check(value, "max_samples")


def max_samples_of(value: int | Mapping[str, int] | None, task: str) -> int | None:
    """The cap of task `task` (None: no cap)."""
    if isinstance(value, Mapping):
        return value.get(task)
    return value
