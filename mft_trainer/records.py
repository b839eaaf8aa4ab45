"""Reading and validating jsonl records: one line of a task file -> one normalised `Record`.

Data is checked where it enters. A bad record is reported with its file, its line, what is wrong
and what is expected, and nothing is dropped without being counted.

Accepted formats (see docs/data_format.md):

- `chat_rounds`: a list of `{"role", "content"}` turns. Roles: `system` (first turn only),
  `human`/`user`, `bot`/`assistant`/`gpt`, alternating user/assistant, ending with an assistant turn.
- single-turn key pairs, with an optional `system`: prompt/answer, prompt/response,
  instruction/output, instruction/response, question/response, question/answer, query/answer,
  input/output. Alpaca records (instruction + input + output) join the instruction and the non-empty
  input with a blank line, so that neither field is lost.
- `text`: plain language-model text, every token trained.

>>> parse_record({"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]})
Record(format=<RecordFormat.CHAT: 'chat'>, messages=(Message(role='user', content='hi'), \
Message(role='assistant', content='hello')), text=None, source=None)
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class RecordFormat(str, Enum):
    CHAT = "chat"
    SINGLE_TURN = "single_turn"
    TEXT = "text"


class Problem(str, Enum):
    """What can be wrong with a record; the value is the short reason used in skip reports."""

    MALFORMED_JSON = "malformed JSON"
    NOT_AN_OBJECT = "not a JSON object"
    UNKNOWN_FORMAT = "no known format"
    AMBIGUOUS_FORMAT = "ambiguous format"
    MALFORMED_TURN = "malformed turn"
    UNKNOWN_ROLE = "unknown role"
    SYSTEM_NOT_FIRST = "system turn not first"
    ROLES_NOT_ALTERNATING = "roles not alternating"
    WRONG_LAST_TURN = "wrong last turn"
    NON_STRING_CONTENT = "non-string content"
    EMPTY_CONTENT = "empty content"


# Every accepted spelling of a role, mapped to the three canonical roles.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
}
ROLE_SPELLINGS = "system, human/user, bot/assistant/gpt"

# (prompt key, answer key) pairs of the single-turn formats, as MFTCoder accepts them.
SINGLE_TURN_KEYS: tuple[tuple[str, str], ...] = (
    ("prompt", "answer"),
    ("prompt", "response"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
    ("input", "output"),
)
_ALPACA_PAIRS = {("instruction", "output"), ("input", "output")}
_EXPECTED_FORMATS = (
    "a 'chat_rounds' list, a 'text' string, or one of the key pairs "
    + ", ".join(f"{p}/{a}" for p, a in SINGLE_TURN_KEYS)
)


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Record:
    """A validated record. `messages` for chat and single-turn records, `text` for text records;
    `source` says where it was read (`path:line`), for errors found after validation."""

    format: RecordFormat
    messages: tuple[Message, ...] = ()
    text: str | None = None
    source: str | None = None

    def to_row(self) -> dict[str, Any]:
        """The record as a row of a `datasets.Dataset` (one schema for every format)."""
        return {
            "format": self.format.value,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "text": self.text,
            "source": self.source,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Record:
        messages = tuple(Message(m["role"], m["content"]) for m in row["messages"])
        return cls(RecordFormat(row["format"]), messages, row["text"], row.get("source"))


class InvalidRecord(ValueError):
    """A record that breaks the data contract; `problem` says which rule, the message says how."""

    def __init__(self, problem: Problem, message: str):
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class RecordError:
    """An invalid record and where it is."""

    path: str
    line: int
    problem: Problem
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class DataValidationError(ValueError):
    """Raised when task data has invalid records (and skipping them was not asked for)."""

    MAX_LISTED = 20

    def __init__(self, errors: Sequence[RecordError]):
        self.errors = list(errors)
        listed = "\n".join(f"  {e}" for e in self.errors[: self.MAX_LISTED])
        more = len(self.errors) - self.MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(self.errors)} invalid record(s) in the task data:\n{listed}{tail}\n"
            "Fix these lines, or set skip_invalid_records=True to skip invalid records "
            "(they are then counted per task and reason in the dataset summary)."
        )


def _check_content(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(
            Problem.NON_STRING_CONTENT, f"{where} is {type(value).__name__}, expected a non-empty string"
        )
    if not value.strip():
        raise InvalidRecord(Problem.EMPTY_CONTENT, f"{where} is empty, expected a non-empty string")
    return value


def parse_messages(turns: Any, *, last_role: str = "assistant", key: str = "chat_rounds") -> tuple[Message, ...]:
    """Validate a list of turns and return them with canonical roles.

    Args:
        turns: the list of `{"role", "content"}` dicts.
        last_role: the role the conversation must end with: "assistant" for training records,
            "user" for inference prompts.
        key: the name used for the list in error messages.
    """
    if not isinstance(turns, list) or not turns:
        raise InvalidRecord(Problem.MALFORMED_TURN, f"'{key}' must be a non-empty list of {{role, content}} objects")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise InvalidRecord(Problem.MALFORMED_TURN, f"{where} must be an object with 'role' and 'content'")
        raw_role = turn["role"]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise InvalidRecord(
                Problem.UNKNOWN_ROLE, f"{where} has unknown role {raw_role!r}; expected one of {ROLE_SPELLINGS}"
            )
        content = _check_content(turn["content"], f"{where}.content ({raw_role})")
        messages.append(Message(role, content))

    first_dialogue_turn = 1 if messages[0].role == "system" else 0
    for index, message in enumerate(messages[first_dialogue_turn:], start=first_dialogue_turn):
        expected = "user" if (index - first_dialogue_turn) % 2 == 0 else "assistant"
        if message.role == "system":
            raise InvalidRecord(
                Problem.SYSTEM_NOT_FIRST, f"{key}[{index}] is a system turn; only the first turn may be a system turn"
            )
        if message.role != expected:
            raise InvalidRecord(
                Problem.ROLES_NOT_ALTERNATING,
                f"{key}[{index}] has role {turns[index]['role']!r} where {'a user' if expected == 'user' else 'an assistant'} turn was expected; "
                "roles must alternate user, assistant, user, ... after an optional first system turn",
            )
    if messages[-1].role != last_role:
        what = "the assistant's answer (the trained part)" if last_role == "assistant" else "the user's question"
        raise InvalidRecord(
            Problem.WRONG_LAST_TURN,
            f"'{key}' ends with a {messages[-1].role} turn; the last turn must be {what}",
        )
    return tuple(messages)


def _single_turn_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(p, a) for p, a in SINGLE_TURN_KEYS if p in record and a in record]


def parse_record(record: Any) -> Record:
    """Validate one decoded jsonl record and normalise it. Raises `InvalidRecord`."""
    if not isinstance(record, Mapping):
        raise InvalidRecord(Problem.NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")

    pairs = _single_turn_pairs(record)
    is_alpaca = set(pairs) == _ALPACA_PAIRS
    candidates = [k for k in ("chat_rounds", "text") if k in record]
    candidates += ["instruction/input/output"] if is_alpaca else [f"{p}/{a}" for p, a in pairs]
    if not candidates:
        raise InvalidRecord(
            Problem.UNKNOWN_FORMAT, f"no known format: expected {_EXPECTED_FORMATS}; found keys {sorted(record)}"
        )
    if len(candidates) > 1:
        raise InvalidRecord(
            Problem.AMBIGUOUS_FORMAT,
            f"record matches several formats ({', '.join(candidates)}); keep the keys of exactly one",
        )

    if "chat_rounds" in record:
        return Record(RecordFormat.CHAT, parse_messages(record["chat_rounds"]))
    if "text" in record:
        return Record(RecordFormat.TEXT, text=_check_content(record["text"], "'text'"))

    prompt_key, answer_key = ("instruction", "output") if is_alpaca else pairs[0]
    context = single_turn_context(record, prompt_key)
    answer = _check_content(record[answer_key], f"'{answer_key}'")
    return Record(RecordFormat.SINGLE_TURN, (*context, Message("assistant", answer)))


def single_turn_context(record: Mapping[str, Any], prompt_key: str) -> list[Message]:
    """The turns before the answer of a single-turn record: an optional system turn, then the user
    turn from `prompt_key`. Training and inference both build their prompts with it.

    An instruction with a non-empty `input` (Alpaca) is joined to it after a blank line, so that
    neither field is lost; an empty or null `system` (common in exported data) means no system turn.

    Raises:
        InvalidRecord: a prompt, input or system that is not a (non-empty) string.
    """
    prompt = _check_content(record[prompt_key], f"'{prompt_key}'")
    if prompt_key == "instruction" and "input" in record:
        extra = record["input"]
        if not isinstance(extra, str):
            raise InvalidRecord(Problem.NON_STRING_CONTENT, f"'input' is {type(extra).__name__}, expected a string")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    messages = [Message("user", prompt)]
    system = record.get("system")
    if system is not None and not (isinstance(system, str) and not system.strip()):
        messages.insert(0, Message("system", _check_content(system, "'system'")))
    return messages


@dataclass
class TaskRecords:
    """The valid records of one task and what was wrong with the others."""

    records: list[Record] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)

    @property
    def skipped_by_problem(self) -> dict[str, int]:
        return dict(Counter(e.problem.value for e in self.errors))


def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, decoded JSON or an `InvalidRecord`) for each non-blank line."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_number, InvalidRecord(Problem.MALFORMED_JSON, f"malformed JSON: not valid UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue  # blank lines are not records
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_number, InvalidRecord(
                    Problem.MALFORMED_JSON, f"malformed JSON: {e.msg} at column {e.colno}"
                )


def read_records(paths: Sequence[Path]) -> TaskRecords:
    """Read and validate every line of the given jsonl files (one task)."""
    result = TaskRecords()
    for path in paths:
        for line_number, decoded in iter_jsonl_lines(path):
            try:
                if isinstance(decoded, InvalidRecord):
                    raise decoded
                record = parse_record(decoded)
                result.records.append(dataclasses.replace(record, source=f"{path}:{line_number}"))
            except InvalidRecord as e:
                result.errors.append(RecordError(str(path), line_number, e.problem, str(e)))
    return result
