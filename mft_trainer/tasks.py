"""Tasks: where each task's data lives, and the registry of task names, ids and loss weights.

A task is a directory of jsonl files (searched recursively) or a single `.jsonl` file. Its name is
the directory's last component (a file's name without `.jsonl`), unless `data_paths` is a mapping
from task name to paths:

>>> resolve_task_sources({"qa": ["data/qa_a.jsonl", "data/qa_b"]})      # doctest: +SKIP
{'qa': [PosixPath('data/qa_a.jsonl'), PosixPath('data/qa_b/part-0.jsonl')]}

The `TaskRegistry` is the single, immutable mapping name <-> id (+ weights) of a run; it is saved
with the run as `tasks.json` so that ids in logs and checkpoints keep their meaning.

>>> tasks = TaskRegistry.from_names(["code_qa", "chat"], weights={"chat": 2.0})
>>> tasks.id_of("chat"), tasks.weights
(1, (1.0, 2.0))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

DataPaths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Any]]

TASKS_FILE = "tasks.json"


def _jsonl_files(path: Path) -> list[Path]:
    """The jsonl files of one path: the file itself, or every *.jsonl below a directory, sorted."""
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise ValueError(f"data directory {str(path)!r} contains no .jsonl file (searched recursively)")
        return files
    if path.suffix != ".jsonl":
        raise ValueError(f"data file {str(path)!r} is not a .jsonl file; a task is a directory of .jsonl files or one")
    return [path]


def _task_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def resolve_task_sources(data_paths: DataPaths) -> dict[str, list[Path]]:
    """Map each task name to its jsonl files, in the order the tasks were given.

    Args:
        data_paths: one path, a list of paths (one task each), or a mapping task name -> path or
            list of paths (the files of all those paths form that task).

    Raises:
        ValueError: no path given, a path that is neither a directory nor a .jsonl file, a directory
            without jsonl files, or two tasks with the same name.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(data_paths, (str, os.PathLike)):
        data_paths = [data_paths]
    if not data_paths:
        raise ValueError(
            "no data paths given: set data_paths to a task directory, a list of them, "
            "or a mapping {task_name: [paths]}"
        )
    sources: dict[str, list[Path]] = {}
    origin: dict[str, str] = {}
    if isinstance(data_paths, Mapping):
        for name, paths in data_paths.items():
            if isinstance(paths, (str, os.PathLike)):
                paths = [paths]
            if not str(name).strip():
                raise ValueError("task names in data_paths must be non-empty strings")
            sources[str(name)] = [f for p in paths for f in _jsonl_files(Path(p))]
        return sources
    for raw in data_paths:
        path = Path(raw)
        files = _jsonl_files(path)
        name = _task_name(path)
        if name in sources:
            raise ValueError(
                f"two tasks are named {name!r} ({origin[name]!r} and {str(path)!r}); task names come from the "
                "last path component, so give data_paths as a mapping {task_name: [paths]} to name them"
            )
        sources[name] = files
        origin[name] = str(path)
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
        """Write `tasks.json` into `directory` and return its path."""
        path = Path(directory) / TASKS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskRegistry:
        """Read a registry from `tasks.json` or from a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TASKS_FILE
        return cls.from_dict(json.loads(path.read_text()))
