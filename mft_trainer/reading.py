"""Reading a task's jsonl files: each line -> a validated `Record`, or a `RecordError` with its line."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import InputFormat, check_text, parse_record
from .records import InvalidRecord, Problem, Record, RecordError, location


@dataclass
class TaskRecords:
    """The valid records of one task and what was wrong with the others."""

    records: list[Record] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)

    @property
    def skipped_by_problem(self) -> dict[str, int]:
        return dict(Counter(e.problem.value for e in self.errors))

    @property
    def empty_answers(self) -> int:
        return sum(r.empty_answers for r in self.records)

    def empty_answer_examples(self, limit: int = 3) -> list[str]:
        """Where the first records with an empty answer are (`path:line`)."""
        return [r.source for r in self.records if r.empty_answers][:limit]


def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, decoded JSON or an `InvalidRecord`) for each non-blank line."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_number, InvalidRecord(Problem.MALFORMED_JSON, f"malformed JSON: not valid UTF-8 ({e.reason})")
                continue
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark
            if not line.strip():
                continue  # blank lines are not records
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_number, InvalidRecord(
                    Problem.MALFORMED_JSON, f"malformed JSON: {e.msg} at column {e.colno}"
                )


def read_records(
    paths: Sequence[Path], record_format: InputFormat | str = InputFormat.AUTO, allow_empty_answers: bool = True
) -> TaskRecords:
    """Read and validate every line of the given jsonl files (one task)."""
    result = TaskRecords()
    for path in paths:
        for line_number, decoded in iter_jsonl_lines(path):
            try:
                if isinstance(decoded, InvalidRecord):
                    raise decoded
                record = parse_record(decoded, record_format, allow_empty_answers)
                check_text(record)
                result.records.append(dataclasses.replace(record, source=location(str(path), line_number)))
            except InvalidRecord as e:
                result.errors.append(RecordError(str(path), line_number, e.problem, str(e)))
    return result
