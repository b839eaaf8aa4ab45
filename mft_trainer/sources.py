"""Task sources: the files, directories and `datasets` specs a task's records come from.

A source is one of:

- a file: `.jsonl`, `.json` (JSON Lines or a JSON array of records), `.parquet`, `.csv` or `.arrow`,
  the extension in any case;
- a directory, searched recursively (symbolic links followed, each directory read once), for such
  files, in sorted order; a directory written by `datasets`' `save_to_disk` inside it (or given
  itself) is one source;
- a `datasets` spec, a mapping `{path, name, split, data_files, revision}` read with
  `datasets.load_dataset` (a hub dataset, or a packaged builder such as `json` with `data_files`),
  or with `load_from_disk` when `path` is a local `save_to_disk` directory. A path that looks local
  is never sent to the hub: it must exist (`mft_trainer.paths`).

Nothing found is dropped silently: what a directory holds and is not read (files that are no data,
hidden directories such as `.ipynb_checkpoints`, dangling symbolic links) is listed with the reason.

>>> found = find_sources("examples/data/code_qa")                                 # doctest: +SKIP
>>> [s.label for s in found.sources], found.skipped                               # doctest: +SKIP
(['examples/data/code_qa/train.jsonl'], [])
>>> find_sources({"path": "org/dataset", "split": "train"}).sources[0].kind       # doctest: +SKIP
<SourceKind.DATASETS: 'datasets'>
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .paths import looks_local, missing_path_hint


class SourceKind(str, Enum):
    JSONL = "jsonl"
    JSON = "json"
    PARQUET = "parquet"
    CSV = "csv"
    ARROW = "arrow"
    SAVED = "saved"  # a directory written by Dataset.save_to_disk / DatasetDict.save_to_disk
    DATASETS = "datasets"  # a datasets.load_dataset spec

    @property
    def is_text(self) -> bool:
        """Read line by line (records named by their line) rather than as rows of a table."""
        return self in (SourceKind.JSONL, SourceKind.JSON)


FILE_KINDS = {f".{kind.value}": kind for kind in (SourceKind.JSONL, SourceKind.JSON, SourceKind.PARQUET,
                                                  SourceKind.CSV, SourceKind.ARROW)}
SUPPORTED_FILES = ", ".join(FILE_KINDS)
SPEC_KEYS = ("path", "name", "split", "data_files", "revision")
# The files by which `save_to_disk` directories are known.
_SAVED_DATASET_FILES = ("state.json", "dataset_info.json")
_SAVED_DATASET_DICT_FILE = "dataset_dict.json"


@dataclass(frozen=True)
class DataSource:
    """One source of a task's records (module docstring). `path` is the file, the directory, or the
    `datasets` path (a hub id, a packaged builder, a local directory)."""

    kind: SourceKind
    path: str
    name: str | None = None
    split: str | None = None
    data_files: Any = None
    revision: str | None = None

    @property
    def label(self) -> str:
        """The source in messages: the path, and for a `datasets` source its config and split."""
        if self.kind is SourceKind.DATASETS or self.split is not None:
            extra = "".join(f" {part}" for part in (self.name and f"({self.name})", self.split and f"[{self.split}]") if part)
            return f"{self.path}{extra}"
        return self.path

    @property
    def unit(self) -> str:
        """How its records are located: by line (text files) or by row (tables, `datasets`)."""
        return "line" if self.kind.is_text else "row"


@dataclass(frozen=True)
class SkippedPath:
    """Something found where data was looked for and not read, and why."""

    path: str
    reason: str
    warn: bool = False  # worth a warning (probably a mistake), not only a line in the summary

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


@dataclass
class TaskSources:
    """The sources found for one task, and what was found and not read."""

    sources: list[DataSource] = field(default_factory=list)
    skipped: list[SkippedPath] = field(default_factory=list)

    def __iadd__(self, other: TaskSources) -> TaskSources:
        self.sources += other.sources
        self.skipped += other.skipped
        return self


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        all((path / name).is_file() for name in _SAVED_DATASET_FILES) or (path / _SAVED_DATASET_DICT_FILE).is_file()
    )


def _file_kind(path: Path) -> SourceKind | None:
    return FILE_KINDS.get(path.suffix.lower())


def _link_target(path: Path) -> str:
    return os.readlink(path) if path.is_symlink() else "?"


def _walk(root: Path) -> TaskSources:
    """The data files and saved datasets below `root`, sorted, and everything else found there."""
    found: list[DataSource] = []
    skipped: list[SkippedPath] = []
    visited: dict[str, Path] = {}  # real path of each directory read -> the path it was read as
    for directory, subdirs, files in os.walk(root, followlinks=True):
        here = Path(directory)
        real = os.path.realpath(here)
        if real in visited:
            skipped.append(SkippedPath(str(here), f"a symbolic link to {visited[real]}, which is read already"))
            subdirs[:] = []
            continue
        visited[real] = here
        if here != root and is_saved_dataset(here):
            found.append(DataSource(SourceKind.SAVED, str(here)))
            subdirs[:] = []
            continue
        kept = []
        for name in sorted(subdirs):
            if name.startswith("."):
                why = ("Jupyter's autosaved copies, not data" if name == ".ipynb_checkpoints" else "a hidden directory")
                skipped.append(SkippedPath(str(here / name), why))
            else:
                kept.append(name)
        subdirs[:] = kept
        for name in sorted(files):
            path = here / name
            kind = _file_kind(path)
            if not path.exists():  # os.walk lists dangling symbolic links as files
                skipped.append(SkippedPath(str(path), f"a symbolic link to {_link_target(path)}, which does not exist",
                                           warn=kind is not None))
            elif kind is None:
                skipped.append(SkippedPath(str(path), "not a data file"))
            else:
                found.append(DataSource(kind, str(path)))
    found.sort(key=lambda source: Path(source.path))
    return TaskSources(found, skipped)


def _path_sources(raw: str | os.PathLike) -> TaskSources:
    path = Path(raw)
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(f"data path {str(path)!r} is a symbolic link to {_link_target(path)}, which does not exist")
        raise FileNotFoundError(f"data path {str(path)!r} does not exist{missing_path_hint(path)}")
    if is_saved_dataset(path):
        return TaskSources([DataSource(SourceKind.SAVED, str(path))])
    if path.is_dir():
        found = _walk(path)
        if not found.sources:
            not_read = "".join(f"; not read: {', '.join(map(str, found.skipped[:5]))}" if found.skipped else "")
            raise ValueError(
                f"data directory {str(path)!r} contains no data file ({SUPPORTED_FILES}, in any case, searched "
                f"recursively, or a save_to_disk directory){not_read}"
            )
        return found
    kind = _file_kind(path)
    if kind is None:
        raise ValueError(
            f"data file {str(path)!r} is not a data file: expected {SUPPORTED_FILES} (in any case); a task is a "
            "directory of such files, one of them, or a datasets spec {path: ..., split: ...}"
        )
    return TaskSources([DataSource(kind, str(path))])


def parse_dataset_spec(spec: Mapping[str, Any]) -> DataSource:
    """A `datasets` spec `{path, name, split, data_files, revision}` as a source.

    A local `path` must exist (it is never asked of the hub); a local `save_to_disk` directory is
    read with `load_from_disk` (then only `split` applies), anything else with `load_dataset`
    (default split "train").

    Raises:
        ValueError: unknown keys, no `path`, or keys that do not apply to a saved directory.
        FileNotFoundError: a local path that does not exist.
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown or not isinstance(spec.get("path"), str) or not spec["path"].strip():
        problem = f"unknown key(s) {unknown}" if unknown else "no 'path'"
        raise ValueError(
            f"datasets spec {dict(spec)!r} has {problem}; expected {{path: org/name or a local directory, name: config, "
            "split: train, data_files: ..., revision: ...}} (only path is required)"
        )
    path = spec["path"]
    if os.path.exists(path) or looks_local(path):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"datasets path {path!r} does not exist{missing_path_hint(path)}; it is a local path, not a hub dataset id"
            )
        if is_saved_dataset(Path(path)):
            extra = sorted(k for k in ("name", "data_files", "revision") if spec.get(k) is not None)
            if extra:
                raise ValueError(f"{path!r} is a save_to_disk directory, read with load_from_disk: {extra} do not apply")
            return DataSource(SourceKind.SAVED, path, split=spec.get("split"))
    return DataSource(
        SourceKind.DATASETS, path, name=spec.get("name"), split=spec.get("split") or "train",
        data_files=spec.get("data_files"), revision=spec.get("revision"),
    )


def is_dataset_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "path" in value and set(value) <= set(SPEC_KEYS)


def find_sources(entry: str | os.PathLike | Mapping[str, Any]) -> TaskSources:
    """The sources of one `data_paths` entry: a file, a directory, or a `datasets` spec (module docstring).

    Raises:
        FileNotFoundError: a path that does not exist (or a dangling symbolic link given as a path).
        ValueError: a file that is no data file, a directory without data, a malformed spec.
    """
    if isinstance(entry, Mapping):
        return TaskSources([parse_dataset_spec(entry)])
    if not isinstance(entry, (str, os.PathLike)):
        raise ValueError(f"a data path must be a path or a datasets spec {{path: ..., split: ...}}, got {entry!r}")
    return _path_sources(entry)


def source_name(entry: str | os.PathLike | Mapping[str, Any]) -> str:
    """The task name an unnamed entry gives: a directory's last component, a file's name without its
    extension, a `datasets` path's last component."""
    if isinstance(entry, Mapping):
        return Path(str(entry["path"]).rstrip("/")).name
    path = Path(entry)
    return path.name if path.is_dir() else path.stem


# ---- reading text files -------------------------------------------------------------------------

def iter_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """(1-based line number, text, None) for each non-blank line of a UTF-8 file, or (line, None,
    what is wrong) for a line that is not UTF-8. A byte order mark is dropped. Only `\\n` ends a line
    (a U+2028 inside a JSON string does not)."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_number, None, f"malformed JSON: not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield line_number, line, None


def _json_array_elements(text: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line, raw JSON of the element, None) for each element of a JSON array, then, if the array is
    malformed, (line, None, what is wrong); the elements after a malformed one cannot be read."""
    decoder = json.JSONDecoder()
    position, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def advance(to: int) -> None:
        nonlocal position, line
        line += text.count("\n", position, to)
        position = to

    advance(skip_space(position))
    if text.startswith("]", position):
        return
    while True:
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            yield line + text.count("\n", position, e.pos), None, (
                f"malformed JSON: {e.msg} (the rest of this JSON array cannot be read)"
            )
            return
        yield line, text[position:end], None
        advance(skip_space(end))
        if text.startswith("]", position):
            return
        if not text.startswith(",", position):
            yield line, None, "malformed JSON: expected ',' or ']' after an array element (the rest cannot be read)"
            return
        advance(skip_space(position + 1))


def iter_json_texts(path: str | os.PathLike, kind: SourceKind) -> Iterator[tuple[int, str | None, str | None]]:
    """(line, raw JSON text of one record, None) for each record of a `.jsonl` or `.json` file, or
    (line, None, what is wrong). A `.json` file holds JSON Lines or one JSON array of records."""
    if kind is SourceKind.JSON:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
        if head.startswith("["):
            try:
                text = Path(path).read_bytes().decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                yield 1, None, f"malformed JSON: not valid UTF-8 ({e.reason} at byte {e.start})"
                return
            yield from _json_array_elements(text)
            return
    for line_number, line, problem in iter_text_lines(path):
        if problem is None and kind is SourceKind.JSON and line_number == 1 and line.strip() == "{":
            yield line_number, None, (
                "a .json file must hold JSON Lines (one record per line) or a JSON array of records; this one "
                "starts with an object over several lines"
            )
            return
        yield line_number, line, problem
