"""Which validation rows each CoBa draw uses (`ValidationStream`), so that a resumed run draws the
same batches as an uninterrupted one and every rank its share of them. mft_trainer/coba.py holds
the balancer's math; mft_trainer/coba_training.py measures the rows drawn here during training.

>>> stream = ValidationStream(size=10, batch_size=4, seed=0)
>>> len(stream.draw(0)), stream.draw(3) == ValidationStream(size=10, batch_size=4, seed=0).draw(3)
(4, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ValidationStream:
    """Which validation rows each CoBa draw uses: an endless walk, reshuffled (seeded) at every pass,
    so that draws mix the tasks whatever the order of the set.

    The walk goes through the whole set (`proportional`, MFTCoder's: a task appears in a draw by its
    share of the set, so a small task misses many draws and its loss slope is noisy), or, with
    `row_tasks` (`uniform`), through the tasks in turn: position p of the walk is a row of task
    `order_r[p % K]` (K tasks, a seeded order for each round r = p // K), that task's r-th row in a
    walk of its own rows, reshuffled at each of its passes. Each draw then holds every task the same
    number of times (±1), and a task's rows repeat only after all of them were drawn.

    Draw k is the global batch of positions ``[k * G, (k + 1) * G)`` of the walk, G = batch_size x
    num_ranks, and each rank takes its slice of `batch_size` rows. A draw depends only on k, the
    seed and the sizes, so a resumed run continues the walk where it stopped, and one process with
    batch G draws the same rows as num_ranks processes with `batch_size`.

    >>> stream = ValidationStream(size=5, batch_size=2, num_ranks=1, rank=0, seed=0)
    >>> sorted(stream.draw(0) + stream.draw(1) + stream.draw(2)[:1])    # the first pass: every row once
    [0, 1, 2, 3, 4]
    >>> uniform = ValidationStream(size=5, batch_size=2, row_tasks=[0, 0, 0, 0, 1])
    >>> [sorted(uniform.row_tasks[i] for i in uniform.draw(k)) for k in range(3)]   # both tasks in every draw
    [[0, 1], [0, 1], [0, 1]]
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        num_ranks: int = 1,
        rank: int = 0,
        seed: int = 0,
        row_tasks: Sequence[int] | None = None,
    ):
        if size < 1:
            raise ValueError("the validation set is empty: CoBa needs validation samples")
        if batch_size < 1 or num_ranks < 1 or not 0 <= rank < num_ranks:
            raise ValueError(f"invalid batch_size {batch_size} / num_ranks {num_ranks} / rank {rank}")
        if row_tasks is not None and len(row_tasks) != size:
            raise ValueError(f"row_tasks has {len(row_tasks)} entries for {size} rows")
        self.size, self.batch_size, self.num_ranks, self.rank, self.seed = size, batch_size, num_ranks, rank, seed
        self.row_tasks = None if row_tasks is None else [int(t) for t in row_tasks]
        self._cached_pass: dict[Any, np.ndarray] = {}  # (task or None) -> (pass index, order)
        if self.row_tasks is not None:
            tasks = sorted(set(self.row_tasks))
            self._task_rows = {t: [i for i, task in enumerate(self.row_tasks) if task == t] for t in tasks}
            self._tasks = tasks

    def _order(self, pass_index: int, task: int | None = None) -> np.ndarray:
        """The seeded order of pass `pass_index` over the set (task None) or over one task's rows."""
        cached = self._cached_pass.get(task)
        if cached is None or cached[0] != pass_index:
            if task is None:
                order = np.random.default_rng([self.seed, pass_index]).permutation(self.size)
            else:
                order = np.random.default_rng([self.seed, 1, task, pass_index]).permutation(len(self._task_rows[task]))
            cached = (pass_index, order)
            self._cached_pass[task] = cached
        return cached[1]

    def _row_at(self, p: int) -> int:
        """The row at position p of the walk."""
        if self.row_tasks is None:
            return int(self._order(p // self.size)[p % self.size])
        rounds, slot = divmod(p, len(self._tasks))
        order = np.random.default_rng([self.seed, 2, rounds]).permutation(len(self._tasks))
        task = self._tasks[order[slot]]
        rows = self._task_rows[task]
        return rows[int(self._order(rounds // len(rows), task)[rounds % len(rows)])]

    def draw(self, k: int) -> list[int]:
        """This rank's rows of draw `k` (0-based): always `batch_size` rows."""
        first = (k * self.num_ranks + self.rank) * self.batch_size
        return [self._row_at(p) for p in range(first, first + self.batch_size)]

    def full_pass(self) -> list[list[int]]:
        """This rank's batches for one pass over the whole set, in order. Every rank gets the same
        number of batches (sharded models need every rank in every forward); a rank's batch may be
        empty at the end, and is then to be run on any row and not counted."""
        global_batch = self.batch_size * self.num_ranks
        batches = []
        for start in range(0, self.size, global_batch):
            first = start + self.rank * self.batch_size
            batches.append(list(range(first, min(first + self.batch_size, self.size))))
        return batches
