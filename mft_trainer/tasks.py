"""Tasks: where each task's data lives, and the registry of task names, ids and loss weights.

A task is a directory of data files (searched recursively), one data file, or a `datasets` spec
(`mft_trainer.sources`). Its name is the directory's last component (a file's name without its
extension, a `datasets` path's last component), unless `data_paths` is a mapping from task name to
sources:

>>> resolve_task_sources({"qa": ["data/qa_a.jsonl", "data/qa_b"]})["qa"].sources      # doctest: +SKIP
[DataSource(kind=<SourceKind.JSONL: 'jsonl'>, path='data/qa_a.jsonl', ...), ...]

The `TaskRegistry` is the single, immutable mapping name <-> id (+ weights) of a run; it is saved
with the run as `tasks.json` so that ids in logs and checkpoints keep their meaning.

>>> tasks = TaskRegistry.from_names(["code_qa", "chat"], weights={"chat": 2.0})
>>> tasks.id_of("chat"), tasks.weights
(1, (1.0, 2.0))
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .run_artifacts import read_tasks, write_tasks
from .sources import SPEC_KEYS, TaskSources, find_sources, is_dataset_spec, source_name

DataPaths = Union[str, os.PathLike, Sequence[Any], Mapping[str, Any]]


def _entries(value: Any) -> list[Any]:
    """One task's entries: a path or a datasets spec, or a list of them."""
    return [value] if isinstance(value, (str, os.PathLike, Mapping)) else list(value)


def resolve_task_sources(data_paths: DataPaths) -> dict[str, TaskSources]:
    """Map each task name to its sources (and what was found and not read), in the order the tasks
    were given.

    Args:
        data_paths: one path, a list of paths or `datasets` specs (one task each), or a mapping task
            name -> path, spec, or list of them (the sources of all of them form that task).

    Raises:
        ValueError: no path given, a path that is neither a directory nor a data file, a directory
            without data, a malformed spec, or two tasks with the same name.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(data_paths, (str, os.PathLike)):
        data_paths = [data_paths]
    if not data_paths:
        raise ValueError(
            "no data paths given: set data_paths to a task directory, a list of them, "
            "or a mapping {task_name: [paths]}"
        )
    if is_dataset_spec(data_paths):
        raise ValueError(
            f"data_paths is one datasets spec ({dict(data_paths)!r}); put it in a list, [{{path: ...}}], or name its "
            f"task, {{task_name: {{path: ...}}}} (a mapping at the top of data_paths maps task names to sources; "
            f"spec keys: {', '.join(SPEC_KEYS)})"
        )
    sources: dict[str, TaskSources] = {}
    origin: dict[str, str] = {}
    if isinstance(data_paths, Mapping):
        for name, entries in data_paths.items():
            if not str(name).strip():
                raise ValueError("task names in data_paths must be non-empty strings")
            found = TaskSources()
            for entry in _entries(entries):
                found += find_sources(entry)
            sources[str(name)] = found
        return sources
    for entry in data_paths:
        found = find_sources(entry)
        name = source_name(entry)
        shown = str(dict(entry)) if isinstance(entry, Mapping) else str(entry)
        if name in sources:
            raise ValueError(
                f"two tasks are named {name!r} ({origin[name]!r} and {shown!r}); task names come from the "
                "last path component, so give data_paths as a mapping {task_name: [paths]} to name them"
            )
        sources[name] = found
        origin[name] = shown
    return sources


@dataclass(frozen=True)
class TaskRegistry:
    """Task names <-> ids (the position in `names`) and per-task loss weights. Immutable."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a task registry needs at least one task")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"task names must be unique, got {list(self.names)}")
        if len(self.weights) != len(self.names):
            raise ValueError(f"{len(self.names)} tasks but {len(self.weights)} weights")
        for name, weight in zip(self.names, self.weights):
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"task weight of {name!r} must be a finite number >= 0, got {weight!r}")
        if not any(w > 0 for w in self.weights):
            raise ValueError("at least one task weight must be > 0")

    @classmethod
    def from_names(cls, names: Iterable[str], weights: Mapping[str, float] | None = None) -> TaskRegistry:
        """Build a registry; tasks missing from `weights` get weight 1.0."""
        names = tuple(names)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"task_weights names unknown task(s) {unknown}; the tasks are {list(names)}")
        return cls(names, tuple(float(weights.get(n, 1.0)) for n in names))

    def with_weights(self, weights: Mapping[str, float]) -> TaskRegistry:
        """A copy with the given weights (tasks not named keep weight 1.0)."""
        return TaskRegistry.from_names(self.names, weights)

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown task {name!r}; the tasks are {list(self.names)}") from None

    def name_of(self, task_id: int) -> str:
        return self.names[task_id]

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [{"id": i, "name": n, "weight": w} for i, (n, w) in enumerate(zip(self.names, self.weights))]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRegistry:
        tasks = sorted(data["tasks"], key=lambda t: t["id"])
        if [t["id"] for t in tasks] != list(range(len(tasks))):
            raise ValueError("task ids in a task registry must be 0..N-1")
        return cls(tuple(t["name"] for t in tasks), tuple(float(t["weight"]) for t in tasks))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tasks.json` into `directory` (mft_trainer.run_artifacts) and return its path."""
        return write_tasks(directory, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskRegistry:
        """Read a registry from `tasks.json` or from a directory holding one."""
        return cls.from_dict(read_tasks(path))
