"""Reading a task: its sources -> a `datasets.Dataset` of validated records, and the invalid ones
with where they are.

Each source first becomes a `datasets.Dataset` of raw records:

- text files (`.jsonl`, `.json`): one row per record with its line and its raw JSON text, written by
  a generator (`Dataset.from_generator`), so that a line that is not JSON, not UTF-8 or holds a lone
  surrogate is that record's error, with its line, and not a failure of the whole file inside pyarrow;
- tables (`.parquet`, `.csv`, `.arrow`, `save_to_disk` directories, `datasets` specs): as `datasets`
  reads them (`load_dataset`, `load_from_disk`); a record is named by its row (0-based).

Then one `datasets.map` (with `num_proc`, cached beside the tokenized tasks) decodes, validates and
normalises every record (`mft_trainer.formats`) into one schema, `RECORD_FEATURES`: a valid record's
format, messages and text, or an invalid one's problem and message. No list of the whole set is
built in Python: the valid records are selected by index, the errors counted with pyarrow.

>>> result = read_task("code_qa", find_sources("examples/data/code_qa").sources)      # doctest: +SKIP
>>> len(result.records), result.errors                                               # doctest: +SKIP
(24, [])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets
from datasets.fingerprint import Hasher

from .cache import cache_file_for, safe_file_name
from .progress import SMALL_DATA_BYTES, SMALL_DATA_ROWS, data_progress_bars
from .formats import InputFormat, check_text, decode_json, parse_record
from .records import InvalidRecord, Problem, RecordError, location
from .sources import DataSource, SourceKind, find_sources, iter_json_texts

# Bump when the record layout changes, so that old cache files are not reused.
_RECORDS_FORMAT_VERSION = 1
# Invalid records kept as `RecordError`s (all are counted); the build lists the first 20.
MAX_ERRORS_KEPT = 10_000

RAW_TEXT_FEATURES = Features(
    {"source": Value("int32"), "position": Value("int64"), "raw": Value("string"), "error": Value("string")}
)
RECORD_FEATURES = Features(
    {
        "format": Value("string"),  # RecordFormat of a valid record, None for an invalid one
        "messages": List({"role": Value("string"), "content": Value("string"), "trained": Value("bool")}),
        "text": Value("string"),
        "source": Value("int32"),  # the index of the record's source in the task's sources
        "position": Value("int64"),  # its line (text files) or row (tables)
        "problem": Value("string"),  # Problem of an invalid record
        "error": Value("string"),  # what is wrong with it
        "empty_answers": Value("int32"),
    }
)


class SourceReadError(ValueError):
    """A source that `datasets` cannot read at all (not one bad record: the file itself)."""


@dataclass
class TaskRecords:
    """The valid records of one task (`RECORD_FEATURES` rows) and what was wrong with the others.

    `errors` holds the first `MAX_ERRORS_KEPT` invalid records; `error_count` counts them all.
    """

    records: Dataset
    sources: list[DataSource]
    errors: list[RecordError] = field(default_factory=list)
    error_count: int = 0
    skipped_by_problem: dict[str, int] = field(default_factory=dict)
    empty_answers: int = 0
    empty_answer_examples: list[str] = field(default_factory=list)  # where the first records with one are

    def location(self, source: int, position: int) -> str:
        """`path:line` or `path: row N` of a record."""
        return location(self.sources[source].label, position, self.sources[source].unit)


# ---- raw records --------------------------------------------------------------------------------

def _text_rows(files: list[tuple[int, str, str, int, int]]) -> Iterator[dict[str, Any]]:
    """Rows of RAW_TEXT_FEATURES for text files given as (source index, path, kind, size, mtime);
    size and mtime are there for the cache key only."""
    for source, path, kind, _size, _mtime in files:
        for position, raw, error in iter_json_texts(path, SourceKind(kind)):
            yield {"source": source, "position": position, "raw": raw, "error": error}


def _text_dataset(run: list[tuple[int, DataSource]], cache_dir: Path, in_memory: bool) -> Dataset:
    files = []
    for index, source in run:
        stat = os.stat(source.path)
        files.append((index, source.path, source.kind.value, stat.st_size, stat.st_mtime_ns))
    try:
        with data_progress_bars(sum(size for _, _, _, size, _ in files) >= SMALL_DATA_BYTES):
            return Dataset.from_generator(
                _text_rows, features=RAW_TEXT_FEATURES, gen_kwargs={"files": files},
                cache_dir=str(cache_dir), keep_in_memory=in_memory,
            )
    except ValueError:
        if next(_text_rows(files), None) is not None:
            raise
        return Dataset.from_dict({name: [] for name in RAW_TEXT_FEATURES}, features=RAW_TEXT_FEATURES)  # no record


def _table_dataset(source: DataSource, cache_dir: Path, in_memory: bool) -> Dataset:
    """A table source as `datasets` reads it (a hub dataset into the Hugging Face cache)."""
    if source.kind is SourceKind.SAVED:
        loaded = datasets.load_from_disk(source.path, keep_in_memory=in_memory)
        if isinstance(loaded, DatasetDict):
            if source.split is None and len(loaded) == 1:
                return next(iter(loaded.values()))
            if source.split not in loaded:
                raise SourceReadError(
                    f"{source.path} is a DatasetDict with splits {list(loaded)}; name one: {{path: {source.path}, "
                    f"split: {next(iter(loaded))}}}" + ("" if source.split is None else f" (no split {source.split!r})")
                )
            return loaded[source.split]
        return loaded
    if source.kind is SourceKind.DATASETS:
        return datasets.load_dataset(
            source.path, name=source.name, split=source.split, data_files=source.data_files, revision=source.revision
        )
    options = {"encoding": "utf-8-sig"} if source.kind is SourceKind.CSV else {}  # a byte order mark is no column name
    with data_progress_bars(os.path.getsize(source.path) >= SMALL_DATA_BYTES):
        return datasets.load_dataset(
            source.kind.value, data_files=[source.path], split="train", cache_dir=str(cache_dir),
            keep_in_memory=in_memory, **options,
        )


# ---- validation ---------------------------------------------------------------------------------

class _Validator:
    """The `datasets.map` function: a batch of raw records -> RECORD_FEATURES rows.

    Args:
        record_format: the task's format (`auto`: detected per record).
        allow_empty_answers: empty assistant turns are trained (else invalid).
        table_source: for the rows of a table, the index of their source (each row's position is its
            index); None for raw text rows (RAW_TEXT_FEATURES).
    """

    def __init__(self, record_format: InputFormat, allow_empty_answers: bool, table_source: int | None):
        self.record_format = record_format
        self.allow_empty_answers = allow_empty_answers
        self.table_source = table_source

    def _add(self, out: dict[str, list], source: int, position: int, record: Any) -> None:
        out["source"].append(source)
        out["position"].append(position)
        try:
            if isinstance(record, InvalidRecord):
                raise record
            parsed = parse_record(record, self.record_format, self.allow_empty_answers)
            check_text(parsed)
        except InvalidRecord as e:
            out["problem"].append(e.problem.value)
            out["error"].append(str(e))
            for name in ("format", "text"):
                out[name].append(None)
            out["messages"].append([])
            out["empty_answers"].append(0)
            return
        row = parsed.to_row()
        for name in ("format", "messages", "text"):
            out[name].append(row[name])
        out["problem"].append(None)
        out["error"].append(None)
        out["empty_answers"].append(parsed.empty_answers)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in RECORD_FEATURES}
        if self.table_source is None:
            for source, position, raw, error in zip(batch["source"], batch["position"], batch["raw"], batch["error"]):
                try:
                    if error is not None:
                        raise InvalidRecord(Problem.MALFORMED_JSON, error)
                    record: Any = decode_json(raw)
                except InvalidRecord as e:
                    record = e
                self._add(out, source, position, record)
            return out
        columns = list(batch)
        for i, index in enumerate(indices):
            # A column a row has no value in (null) is a key the record does not have: tables hold the
            # union of their records' keys.
            row = {name: batch[name][i] for name in columns if batch[name][i] is not None}
            self._add(out, self.table_source, index, row)
        return out


def _validate(
    name: str, raw: Dataset, validator: _Validator, cache_dir: Path | None, num_proc: int | None, key: str
) -> Dataset:
    if len(raw) == 0:  # map gives an empty dataset its columns, not RECORD_FEATURES
        return Dataset.from_dict({column: [] for column in RECORD_FEATURES}, features=RECORD_FEATURES)
    fingerprint = Hasher.hash([_RECORDS_FORMAT_VERSION, raw._fingerprint, key])
    cache_file = cache_file_for(cache_dir, f"records-{safe_file_name(name)}-{fingerprint}.arrow")
    with data_progress_bars(len(raw) >= SMALL_DATA_ROWS):
        return raw.map(
            validator,
            batched=True,
            batch_size=1000,
            with_indices=validator.table_source is not None,
            remove_columns=raw.column_names,
            features=RECORD_FEATURES,
            num_proc=num_proc if num_proc and len(raw) > 1 else None,
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
            new_fingerprint=fingerprint,
            desc=f"Validating {name}",
        )


def _read_raw(source: DataSource, read: Any) -> Any:
    """`read()`, with a failure to read the source (not one of its records) named by the source."""
    try:
        return read()
    except (FileNotFoundError, SourceReadError):
        raise
    except Exception as e:  # noqa: BLE001 - any reader's failure, reported with the source it is about
        cause = e.__cause__ or e
        raise SourceReadError(
            f"{source.label}: datasets cannot read it ({type(cause).__name__}: {cause}); check that it is a valid "
            f"{source.kind.value} source"
        ) from e


def read_task(
    name: str,
    sources: Sequence[DataSource],
    record_format: InputFormat | str = InputFormat.AUTO,
    allow_empty_answers: bool = True,
    cache_dir: Path | None = None,
    num_proc: int | None = None,
) -> TaskRecords:
    """Read and validate every record of one task's sources (module docstring).

    Args:
        name: the task's name (progress bars, cache file names).
        sources: its sources (`mft_trainer.sources.find_sources`).
        record_format: the task's record format (`auto` detects it per record).
        allow_empty_answers: train empty assistant turns (else the records are invalid).
        cache_dir: where raw and validated records are cached (None: in memory, nothing written).
        num_proc: processes for the validation map.

    Raises:
        SourceReadError: a source that `datasets` cannot read at all, named.
    """
    sources = list(sources)
    record_format = InputFormat.parse(record_format)
    allow = bool(allow_empty_answers)
    in_memory = cache_dir is None
    # Without a cache, the generator and load_dataset still write files: into a scratch directory,
    # read back into memory and removed.
    scratch = tempfile.TemporaryDirectory(prefix="mft_sources_") if in_memory else contextlib.nullcontext()
    with scratch as scratch_dir:
        source_cache = Path(scratch_dir) if in_memory else cache_dir / "sources"
        parts: list[Dataset] = []
        run: list[tuple[int, DataSource]] = []

        def flush_text_run() -> None:
            if run:
                raw = _read_raw(run[0][1], lambda: _text_dataset(list(run), source_cache, in_memory))
                validator = _Validator(record_format, allow, None)
                parts.append(_validate(name, raw, validator, cache_dir, num_proc, f"{record_format.value}-{allow}"))
                run.clear()

        for index, source in enumerate(sources):
            if source.kind.is_text:
                run.append((index, source))  # consecutive text files are read by one generator
                continue
            flush_text_run()
            raw = _read_raw(source, lambda: _table_dataset(source, source_cache, in_memory))
            validator = _Validator(record_format, allow, index)
            parts.append(_validate(name, raw, validator, cache_dir, num_proc, f"{record_format.value}-{allow}-{index}"))
        flush_text_run()
    validated = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return _collect(validated, sources)


def _collect(validated: Dataset, sources: list[DataSource]) -> TaskRecords:
    """Split validated rows into the valid records and the errors, counting with pyarrow."""
    invalid = validated.data.column("error").is_valid().to_numpy(zero_copy_only=False)  # [N] bool
    empty = validated.data.column("empty_answers").to_numpy()  # [N]
    result = TaskRecords(records=validated, sources=sources)
    if invalid.any():
        error_rows = np.flatnonzero(invalid)
        result.records = validated.select(np.flatnonzero(~invalid))
        result.error_count = len(error_rows)
        counts = pc.value_counts(validated.data.column("problem").drop_null())
        result.skipped_by_problem = {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}
        shown = validated.select(error_rows[:MAX_ERRORS_KEPT]).select_columns(["source", "position", "problem", "error"])
        for row in shown:
            source = sources[row["source"]]
            result.errors.append(RecordError(source.label, row["position"], Problem(row["problem"]), row["error"], source.unit))
    result.empty_answers = int(empty.sum())
    for row_index in np.flatnonzero(empty > 0)[:3].tolist():
        result.empty_answer_examples.append(result.location(validated[row_index]["source"], validated[row_index]["position"]))
    return result


def read_records(
    paths: Sequence[str | os.PathLike | DataSource],
    record_format: InputFormat | str = InputFormat.AUTO,
    allow_empty_answers: bool = True,
) -> TaskRecords:
    """Read and validate the records of some paths (files, directories) or sources, in memory."""
    sources: list[DataSource] = []
    for path in paths:
        sources += [path] if isinstance(path, DataSource) else find_sources(path).sources
    return read_task("records", sources, record_format, allow_empty_answers)
