"""The dataset summary: per task, what was read, what was kept and what was left out, and why; and,
for the packed modes, how full the rows are."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TaskSummary:
    """Counts for one task (train and explicit validation files together).

    The mixture: of its `train_samples` (the samples available), one epoch holds `samples_per_epoch`
    (task_sampling), with `epoch_trained_tokens`, a `trained_token_share` of the epoch's trained tokens.

    `records` are the valid records read from `sources` (`not_read`: what the task's directories hold
    and was not read, with the reason); `samples` those kept after the over-length policy, split
    into `train_samples` + `valid_samples`. `tokens` and `trained_tokens` count the kept samples.
    """

    name: str
    files: int = 0  # sources read
    sources: list[str] = field(default_factory=list)  # what was read: files, saved datasets, datasets specs
    not_read: list[str] = field(default_factory=list)  # what was found in its directories and not read, and why
    records: int = 0
    skipped_invalid: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    empty_answers: int = 0  # assistant turns with no content, trained as empty answers (empty_answers: train)
    empty_answer_examples: list[str] = field(default_factory=list)  # where the first of them are
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_trained_token: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    train_samples: int = 0
    valid_samples: int = 0
    over_max_samples: int = 0  # valid records left out by max_samples
    samples_per_epoch: int = 0  # training samples in one epoch of the task mixture (task_sampling)
    epoch_trained_tokens: int = 0  # their trained tokens
    trained_token_share: float = 0.0  # epoch_trained_tokens / all tasks' epoch_trained_tokens


@dataclass
class PackingSummary:
    """How one split was laid out in rows of `seq_length` (padding_mode pack or concat).

    `samples` whole samples were laid out as `segments` pieces (more segments than samples only in
    concat mode, where a document may span rows) in `rows` rows holding `tokens` real tokens.
    """

    split: str  # "train" or "valid"
    rows: int = 0
    samples: int = 0
    segments: int = 0
    tokens: int = 0
    seq_length: int = 0

    @property
    def capacity(self) -> int:
        """Tokens the rows could hold."""
        return self.rows * self.seq_length

    @property
    def efficiency(self) -> float:
        """Real tokens / row capacity (1.0 = no padding at all)."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "capacity": self.capacity, "efficiency": self.efficiency}

    def __str__(self) -> str:
        text = (
            f"{self.split}: {self.samples} samples in {self.rows} rows of {self.seq_length} tokens, "
            f"{self.tokens} real tokens of {self.capacity} ({100 * self.efficiency:.1f}% efficiency)"
        )
        if self.segments > self.samples:
            text += f", {self.segments - self.samples} documents continued in the next row"
        return text


def _listing(items: list[str], limit: int = 5) -> str:
    """The first `limit` items, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# (header, attribute) of the printed table, in order.
_COLUMNS = (
    ("task", "name"),
    ("records", "records"),
    ("skipped", "skipped_invalid"),
    ("over max", "over_max_samples"),
    ("empty", "empty_answers"),
    ("too long", "dropped_too_long"),
    ("truncated", "truncated"),
    ("no loss", "dropped_no_trained_token"),
    ("samples", "samples"),
    ("tokens", "tokens"),
    ("trained", "trained_tokens"),
    ("train", "train_samples"),
    ("valid", "valid_samples"),
)


@dataclass
class DatasetSummary:
    """What `build_mft_dataset` built; `str(summary)` is the printed table.

    `packing` has one entry per split laid out in rows at build time (padding_mode pack or concat),
    empty for padding and padding_free, whose rows are made per batch by the collator.
    """

    tasks: list[TaskSummary]
    seq_length: int
    overlength_policy: str
    data_split: str
    warnings: list[str] = field(default_factory=list)
    task_sampling: str = "proportional"
    padding_mode: str = "padding"
    packing: list[PackingSummary] = field(default_factory=list)

    @property
    def total(self) -> TaskSummary:
        """The counts of all tasks added up (the lists of sources and examples stay per task)."""
        total = TaskSummary(name="total")
        for task in self.tasks:
            for reason, count in task.skipped_reasons.items():
                total.skipped_reasons[reason] = total.skipped_reasons.get(reason, 0) + count
            for f in fields(TaskSummary):
                if isinstance(getattr(task, f.name), int):
                    setattr(total, f.name, getattr(total, f.name) + getattr(task, f.name))
            total.trained_token_share += task.trained_token_share
        return total

    def task(self, name: str) -> TaskSummary:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r} in the summary; tasks are {[t.name for t in self.tasks]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_length": self.seq_length,
            "overlength_policy": self.overlength_policy,
            "data_split": self.data_split,
            "tasks": [asdict(t) for t in self.tasks],
            "total": asdict(self.total),
            "warnings": list(self.warnings),
            "task_sampling": self.task_sampling,
            "padding_mode": self.padding_mode,
            "packing": [p.to_dict() for p in self.packing],
        }

    def _mixture_lines(self) -> list[str]:
        """The epoch of the task mixture: per task, samples available, samples per epoch, share of trained tokens."""
        per_epoch = sum(t.samples_per_epoch for t in self.tasks)
        rows = [[t.name, str(t.train_samples), str(t.samples_per_epoch), f"{100 * t.trained_token_share:.1f}%"]
                for t in self.tasks]
        headers = ["task", "available", "per epoch", "trained-token share"]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        out = [f"task mixture ({self.task_sampling}): {per_epoch} training samples per epoch"]
        for cells in [headers, *rows]:
            out.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
        return out

    def __str__(self) -> str:
        rows = [[str(getattr(t, attr)) for _, attr in _COLUMNS] for t in [*self.tasks, self.total]]
        headers = [h for h, _ in _COLUMNS]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [
            f"Multi-task dataset: {len(self.tasks)} tasks, seq_length {self.seq_length} "
            f"(over-length: {self.overlength_policy}), split {self.data_split}",
            line(headers),
            line(["-" * w for w in widths]),
            *(line(r) for r in rows[:-1]),
            line(["-" * w for w in widths]),
            line(rows[-1]),
        ]
        for task in self.tasks:
            if task.skipped_reasons:
                reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(task.skipped_reasons.items()))
                out.append(f"skipped in {task.name}: {reasons}")
        out += self._mixture_lines()
        for task in self.tasks:
            out.append(f"{task.name}: read {len(task.sources)} source(s): {_listing(task.sources)}")
            if task.not_read:
                out.append(f"  not read: {_listing(task.not_read)}")
        if self.padding_mode != "padding":
            out.append(f"padding_mode {self.padding_mode}" + (":" if self.packing else " (rows made per batch)"))
            out += [f"  {p}" for p in self.packing]
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)
