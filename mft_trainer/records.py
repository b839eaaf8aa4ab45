"""Records: the validated form every record format becomes, and what can be wrong with one.

A record of any format (`mft_trainer.formats`) becomes a `Record`: a conversation of `Message`s
(system, user and assistant turns) or a `text`. Data is checked where it enters: a bad record is
reported with where it is (file and line, or the row of a columnar file), what is wrong and what
is expected, and nothing is dropped without being counted.

`parse_messages` validates a list of turns, whatever the format calls its keys: `{"role",
"content"}` (chat_rounds, OpenAI/TRL messages) or `{"from", "value"}` (ShareGPT); a content is a
string or a list of text parts (`[{"type": "text", "text": ...}]`). Roles: `system` (first turn
only), `human`/`user`, `bot`/`assistant`/`gpt`, alternating user/assistant.

>>> parse_messages([{"role": "human", "content": "hi"}, {"from": "gpt", "value": "hello"}])
(Message(role='user', content='hi', trained=True), Message(role='assistant', content='hello', trained=True))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class RecordFormat(str, Enum):
    """What a validated record is: a conversation (several rounds, or a single-turn pair) or text."""

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
    TOOL_USE = "tool use"
    MULTIMODAL_CONTENT = "multimodal content"
    SYSTEM_NOT_FIRST = "system turn not first"
    ROLES_NOT_ALTERNATING = "roles not alternating"
    WRONG_LAST_TURN = "wrong last turn"
    NON_STRING_CONTENT = "non-string content"
    EMPTY_CONTENT = "empty content"
    INVALID_TEXT = "invalid text"


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
# Roles of tool use (OpenAI, ShareGPT, Llama): named in the error, since the fix is not a typo.
_TOOL_ROLES = {"tool", "function", "ipython", "observation", "function_call", "tool_call", "tool_response"}
# The key pairs a turn may use: OpenAI/TRL and chat_rounds, then ShareGPT.
TURN_KEYS: tuple[tuple[str, str], ...] = (("role", "content"), ("from", "value"))


def canonical_role(spelling: Any) -> str | None:
    """The role ("system", "user" or "assistant") a spelling means, in any case and with spaces
    around it; None for anything else (unknown roles, tool roles, non-strings).

    >>> canonical_role(" Human"), canonical_role("gpt"), canonical_role("tool")
    ('user', 'assistant', None)
    """
    return ROLE_ALIASES.get(spelling.strip().lower()) if isinstance(spelling, str) else None


@dataclass(frozen=True)
class Message:
    """One turn. `trained` is False only for assistant turns that are context, not targets (the
    assistant turns inside a TRL prompt/completion record's prompt)."""

    role: str  # "system", "user" or "assistant"
    content: str
    trained: bool = True


@dataclass(frozen=True)
class Record:
    """A validated record. `messages` for chat and single-turn records, `text` for text records;
    `source` says where it was read (`path:line`), for errors found after validation."""

    format: RecordFormat
    messages: tuple[Message, ...] = ()
    text: str | None = None
    source: str | None = None

    @property
    def empty_answers(self) -> int:
        """Assistant turns with no content (trained as an empty answer: MFTCoder's "\\n" + EOS)."""
        return sum(m.role == "assistant" and not m.content.strip() for m in self.messages)

    def to_row(self) -> dict[str, Any]:
        """The record as a row of a `datasets.Dataset` (one schema for every format)."""
        return {
            "format": self.format.value,
            "messages": [{"role": m.role, "content": m.content, "trained": m.trained} for m in self.messages],
            "text": self.text,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], source: str | None = None) -> Record:
        messages = tuple(Message(m["role"], m["content"], m.get("trained", True)) for m in row["messages"])
        return cls(RecordFormat(row["format"]), messages, row["text"], source)


class InvalidRecord(ValueError):
    """A record that breaks the data contract; `problem` says which rule, the message says how."""

    def __init__(self, problem: Problem, message: str):
        super().__init__(message)
        self.problem = problem


def location(path: str, position: int, unit: str = "line") -> str:
    """Where a record is: `path:12` for the line of a text file, `path: row 12` for the row (0-based,
    as `dataset[12]`) of a columnar file or a `datasets` source."""
    return f"{path}:{position}" if unit == "line" else f"{path}: row {position}"


@dataclass(frozen=True)
class RecordError:
    """An invalid record and where it is: `line` is a 1-based line (unit "line") or a 0-based row index
    (unit "row")."""

    path: str
    line: int
    problem: Problem
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{location(self.path, self.line, self.unit)}: {self.message}"


# An error message lists this many invalid records and counts the rest: a file broken throughout
# (a wrong format, a bad export) would otherwise print every one of its lines.
MAX_LISTED_ERRORS = 20


def listed_errors(errors: Sequence[RecordError], total: int | None = None) -> str:
    """The first `MAX_LISTED_ERRORS` errors, one per indented line, then how many more there are of
    `total` (default: all of `errors`), for an error message.

    >>> print(listed_errors([RecordError("a.jsonl", 3, Problem.EMPTY_CONTENT, "'prompt' is empty")], total=25))
      a.jsonl:3: 'prompt' is empty
      ... and 24 more
    """
    total = len(errors) if total is None else total
    listed = "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
    more = total - min(len(errors), MAX_LISTED_ERRORS)
    return listed + (f"\n  ... and {more} more" if more > 0 else "")


class DataValidationError(ValueError):
    """Raised when task data has invalid records (and skipping them was not asked for)."""

    def __init__(self, errors: Sequence[RecordError], total: int | None = None):
        self.errors = list(errors)
        self.total = len(self.errors) if total is None else total
        super().__init__(
            f"{self.total} invalid record(s) in the task data:\n{listed_errors(self.errors, self.total)}\n"
            "Fix these lines, or set skip_invalid_records=True to skip invalid records "
            "(they are then counted per task and reason in the dataset summary)."
        )


def check_content(value: Any, where: str, allow_empty: bool = False) -> str:
    """`value` as a turn's content: a string, non-empty unless `allow_empty`."""
    if not isinstance(value, str):
        raise InvalidRecord(
            Problem.NON_STRING_CONTENT, f"{where} is {type(value).__name__}, expected a non-empty string"
        )
    if not allow_empty and not value.strip():
        raise InvalidRecord(Problem.EMPTY_CONTENT, f"{where} is empty, expected a non-empty string")
    return value


def _text_of_parts(parts: list, where: str) -> str:
    """The text of a content given as parts (OpenAI/TRL): the text parts joined; any other part is
    multimodal and cannot be trained with a text model."""
    texts = []
    for index, part in enumerate(parts):
        part_where = f"{where}[{index}]"
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InvalidRecord(
                Problem.MALFORMED_TURN, f'{part_where} must be an object with a "type", e.g. {{"type": "text", "text": ...}}'
            )
        if part["type"] != "text":
            raise InvalidRecord(
                Problem.MULTIMODAL_CONTENT,
                f"{part_where} is a {part['type']!r} part; only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                "supported (images, audio and files cannot be trained with a text model)",
            )
        texts.append(check_content(part.get("text"), f"{part_where}.text", allow_empty=True))
    return "".join(texts)


def _turn_role_and_content(turn: Any, where: str) -> tuple[Any, Any]:
    """The raw role and content of a turn written with either key pair of `TURN_KEYS`."""
    if isinstance(turn, Mapping):
        if turn.get("tool_calls") or turn.get("function_call"):
            raise InvalidRecord(
                Problem.TOOL_USE,
                f"{where} has tool calls; tool use is not supported, only text turns (system, user, assistant)",
            )
        for role_key, content_key in TURN_KEYS:
            if role_key in turn and content_key in turn:
                return turn[role_key], turn[content_key]
    raise InvalidRecord(
        Problem.MALFORMED_TURN, f"{where} must be an object with 'role' and 'content' (or ShareGPT's 'from' and 'value')"
    )


def parse_turns(
    turns: Any,
    names: Callable[[int], str],
    *,
    last_role: str = "assistant",
    what: str = "'chat_rounds'",
    allow_empty_answers: bool = True,
    trained: Callable[[int], bool] = lambda index: True,
) -> tuple[Message, ...]:
    """Validate a list of turns and return them with canonical roles (see `parse_messages`).

    Args:
        turns: the list of turns.
        names: the name of turn `i` in error messages (`messages[2]`, `completion[0]`).
        last_role: the role the conversation must end with.
        what: the list's name in error messages.
        allow_empty_answers: accept assistant turns with an empty content (MFTCoder trains them).
        trained: whether the assistant turn at index `i` is a training target.
    """
    if not isinstance(turns, (list, tuple)) or not turns:
        raise InvalidRecord(Problem.MALFORMED_TURN, f"{what} must be a non-empty list of {{role, content}} objects")
    messages: list[Message] = []
    raw_roles: list[Any] = []
    indices: list[int] = []  # the index in `turns` of each message (an empty system turn is left out)
    for index, turn in enumerate(turns):
        where = names(index)
        raw_role, raw_content = _turn_role_and_content(turn, where)
        role = canonical_role(raw_role)
        if role is None:
            tool = isinstance(raw_role, str) and raw_role.strip().lower() in _TOOL_ROLES
            raise InvalidRecord(
                Problem.UNKNOWN_ROLE,
                f"{where} has unknown role {raw_role!r}; expected one of {ROLE_SPELLINGS}"
                + (" (tool use is not supported: no tool or function turns)" if tool else ""),
            )
        content_where = f"{where}.content ({raw_role})"
        if isinstance(raw_content, (list, tuple)):
            raw_content = _text_of_parts(list(raw_content), f"{where}.content")
        content = check_content(raw_content, content_where, allow_empty=role != "user")
        if role == "system" and not content.strip():
            continue  # an empty system prompt is no system prompt (as for single-turn records)
        if role == "assistant" and not content.strip() and not allow_empty_answers:
            raise InvalidRecord(
                Problem.EMPTY_CONTENT,
                f"{content_where} is empty, expected a non-empty string (empty_answers is 'invalid'; with 'train' it is "
                "trained as an empty answer, as MFTCoder does)",
            )
        messages.append(Message(role, content, trained(index) if role == "assistant" else True))
        raw_roles.append(raw_role)
        indices.append(index)
    if not messages:
        raise InvalidRecord(Problem.WRONG_LAST_TURN, f"{what} has only an empty system turn; it needs a conversation")

    first_dialogue_turn = 1 if messages[0].role == "system" else 0
    for position, message in enumerate(messages[first_dialogue_turn:], start=first_dialogue_turn):
        expected = "user" if (position - first_dialogue_turn) % 2 == 0 else "assistant"
        where = names(indices[position])
        if message.role == "system":
            raise InvalidRecord(
                Problem.SYSTEM_NOT_FIRST, f"{where} is a system turn; only the first turn may be a system turn"
            )
        if message.role != expected:
            raise InvalidRecord(
                Problem.ROLES_NOT_ALTERNATING,
                f"{where} has role {raw_roles[position]!r} where {'a user' if expected == 'user' else 'an assistant'} "
                "turn was expected; roles must alternate user, assistant, user, ... after an optional first system turn",
            )
    if messages[-1].role != last_role:
        target = "the assistant's answer (the trained part)" if last_role == "assistant" else "the user's question"
        raise InvalidRecord(
            Problem.WRONG_LAST_TURN, f"{what} ends with a {messages[-1].role} turn; the last turn must be {target}"
        )
    return tuple(messages)


def parse_messages(
    turns: Any, *, last_role: str = "assistant", key: str = "chat_rounds", allow_empty_answers: bool = True
) -> tuple[Message, ...]:
    """Validate a list of turns and return them with canonical roles.

    Args:
        turns: the list of turns, `{"role", "content"}` or `{"from", "value"}` objects; a content is a
            string or a list of text parts.
        last_role: the role the conversation must end with: "assistant" for training records,
            "user" for inference prompts.
        key: the name used for the list in error messages.
        allow_empty_answers: accept assistant turns with no content (trained as MFTCoder does).

    Raises:
        InvalidRecord: the message names the turn and what is wrong with it.
    """
    return parse_turns(
        turns, lambda index: f"{key}[{index}]", last_role=last_role, what=f"'{key}'",
        allow_empty_answers=allow_empty_answers,
    )
