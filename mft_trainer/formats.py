"""Record formats: one decoded record (a JSON object, or a row of a parquet/csv/arrow/`datasets`
source) -> a validated `Record`, whatever format it is written in.

The format is detected per record from its keys, or set per task (`DataConfig.record_format`):

| format | keys | becomes |
|---|---|---|
| `chat_rounds` | `chat_rounds`: `[{"role", "content"}, ...]` (MFTCoder) | a conversation |
| `messages` | `messages`: `[{"role", "content"}, ...]` (OpenAI, TRL); optional `system` | a conversation |
| `sharegpt` | `conversations`: `[{"from", "value"}, ...]`; optional `system` | a conversation |
| `prompt_completion` | `prompt`, `completion` (TRL): two strings, or two lists of messages | a pair, or a conversation whose completion is trained |
| `alpaca` | `instruction`, optional `input`, `output` (or `response`); optional `system` | a single-turn pair |
| `single_turn` | prompt/answer, prompt/response, question/answer, ... (`SINGLE_TURN_KEYS`); optional `system` | a single-turn pair |
| `text` | `text` | plain language-model text |

Contents are strings, or (messages) lists of text parts `[{"type": "text", "text": ...}]`. Tool use
(tool roles, `tool_calls`, `tools`) and multimodal parts are errors that say what is supported.
Keys of no format (`id`, `source`, ...) are ignored.

>>> parse_record({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}).messages
(Message(role='user', content='hi', trained=True), Message(role='assistant', content='hello', trained=True))
>>> detect_format({"instruction": "Add 2 and 3.", "input": "", "output": "5"})
<InputFormat.ALPACA: 'alpaca'>
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

from .records import InvalidRecord, Message, Problem, Record, RecordFormat, canonical_role, check_content, parse_turns


class InputFormat(str, Enum):
    """The record formats a task's data may be written in (`DataConfig.record_format`)."""

    AUTO = "auto"  # detected per record from its keys
    CHAT_ROUNDS = "chat_rounds"
    MESSAGES = "messages"
    SHAREGPT = "sharegpt"
    PROMPT_COMPLETION = "prompt_completion"
    ALPACA = "alpaca"
    SINGLE_TURN = "single_turn"
    TEXT = "text"

    @classmethod
    def parse(cls, value: str | InputFormat, where: str = "record_format") -> InputFormat:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{where} must be one of {[f.value for f in cls]}, got {value!r}") from None


# The key of the list of turns of each conversation format.
LIST_KEYS: dict[InputFormat, str] = {
    InputFormat.CHAT_ROUNDS: "chat_rounds",
    InputFormat.MESSAGES: "messages",
    InputFormat.SHAREGPT: "conversations",
}

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
# The prompt keys of the single-turn formats: a prompt record (batch inference) is one without its answer.
PROMPT_KEYS: tuple[str, ...] = tuple(dict.fromkeys(prompt for prompt, _ in SINGLE_TURN_KEYS))

_EXPECTED_FORMATS = (
    "a 'chat_rounds', 'messages' or 'conversations' list, a 'text' string, 'prompt' and 'completion', or one of the "
    "key pairs " + ", ".join(f"{p}/{a}" for p, a in SINGLE_TURN_KEYS)
)


def _single_turn_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(p, a) for p, a in SINGLE_TURN_KEYS if p in record and a in record]


def _candidates(record: Mapping[str, Any]) -> list[tuple[InputFormat, str]]:
    """Every format whose keys the record has, with the keys (for messages)."""
    found = [(fmt, key) for fmt, key in LIST_KEYS.items() if key in record]
    if "text" in record:
        found.append((InputFormat.TEXT, "text"))
    if "prompt" in record and "completion" in record:
        found.append((InputFormat.PROMPT_COMPLETION, "prompt/completion"))
    pairs = _single_turn_pairs(record)
    if set(pairs) == _ALPACA_PAIRS:
        found.append((InputFormat.ALPACA, "instruction/input/output"))
    else:
        found += [(InputFormat.ALPACA if p == "instruction" else InputFormat.SINGLE_TURN, f"{p}/{a}") for p, a in pairs]
    return found


def _unknown_format(record: Mapping[str, Any], expected: str) -> InvalidRecord:
    hint = ""
    if "chosen" in record or "rejected" in record:
        hint = " (chosen/rejected is preference data, for DPO-style training, not supervised fine-tuning)"
    return InvalidRecord(Problem.UNKNOWN_FORMAT, f"no known format: expected {expected}; found keys {sorted(record)}{hint}")


def decode_json(raw: str) -> Any:
    """One record's JSON text, decoded.

    Raises:
        InvalidRecord: malformed JSON, with the column.
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRecord(Problem.MALFORMED_JSON, f"malformed JSON: {e.msg} at column {e.colno}") from None


def detect_format(record: Mapping[str, Any]) -> InputFormat:
    """The format of a record, from its keys.

    Raises:
        InvalidRecord: no format's keys, or the keys of several formats.
    """
    candidates = _candidates(record)
    if not candidates:
        raise _unknown_format(record, _EXPECTED_FORMATS)
    if len(candidates) > 1:
        raise InvalidRecord(
            Problem.AMBIGUOUS_FORMAT,
            f"record matches several formats ({', '.join(keys for _, keys in candidates)}); keep the keys of exactly one, "
            "or set record_format for the task",
        )
    return candidates[0][0]


def _conversation_system(record: Mapping[str, Any], turns: Any) -> list[Message]:
    """The top-level `system` of a messages/ShareGPT record (LLaMA-Factory's ShareGPT has one), as a
    turn to put first; none when empty, an error when the list has a system turn too."""
    system = record.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    check_content(system, "'system'")
    first = turns[0] if isinstance(turns, (list, tuple)) and turns else None
    first_role = (first.get("role") or first.get("from")) if isinstance(first, Mapping) else None
    if canonical_role(first_role) == "system":
        raise InvalidRecord(
            Problem.AMBIGUOUS_FORMAT, "record has both a 'system' field and a first system turn; keep one of them"
        )
    return [Message("system", system)]


def _refuse_tools(record: Mapping[str, Any]) -> None:
    if record.get("tools"):
        raise InvalidRecord(
            Problem.TOOL_USE, "record defines 'tools'; tool use is not supported, only text turns (system, user, assistant)"
        )


def _conversation(record: Mapping[str, Any], key: str, allow_empty_answers: bool, last_role: str) -> tuple[Message, ...]:
    _refuse_tools(record)
    turns = record[key]
    system = _conversation_system(record, turns)
    messages = parse_turns(
        turns, lambda index: f"{key}[{index}]", last_role=last_role, what=f"'{key}'",
        allow_empty_answers=allow_empty_answers,
    )
    return (*system, *messages)


def _prompt_completion(record: Mapping[str, Any], allow_empty_answers: bool) -> Record:
    """TRL's prompt/completion: two strings (a single-turn pair), or two lists of messages joined into
    one conversation whose completion is trained (assistant turns inside the prompt are context)."""
    _refuse_tools(record)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        context = single_turn_context(record, "prompt")
        answer = check_content(completion, "'completion'", allow_empty=allow_empty_answers)
        return Record(RecordFormat.SINGLE_TURN, (*context, Message("assistant", answer)))
    if not (isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple))):
        raise InvalidRecord(
            Problem.MALFORMED_TURN,
            f"'prompt' is {type(prompt).__name__} and 'completion' is {type(completion).__name__}; they must be two "
            "strings (a prompt and its answer) or two lists of messages (TRL's conversational prompt/completion)",
        )
    if not prompt or not completion:
        raise InvalidRecord(Problem.MALFORMED_TURN, "'prompt' and 'completion' must both be non-empty lists of messages")
    turns = [*prompt, *completion]
    split = len(prompt)
    messages = parse_turns(
        turns,
        lambda index: f"prompt[{index}]" if index < split else f"completion[{index - split}]",
        what="'prompt' + 'completion'",
        allow_empty_answers=allow_empty_answers,
        trained=lambda index: index >= split,
    )
    if not any(m.trained for m in messages if m.role == "assistant"):
        raise InvalidRecord(Problem.WRONG_LAST_TURN, "'completion' has no assistant turn: nothing to train")
    return Record(RecordFormat.CHAT, messages)


def single_turn_context(record: Mapping[str, Any], prompt_key: str) -> list[Message]:
    """The turns before the answer of a single-turn record: an optional system turn, then the user
    turn from `prompt_key`. Training and inference both build their prompts with it.

    An instruction with a non-empty `input` (Alpaca) is joined to it after a blank line, so that
    neither field is lost; an empty or null `system` (common in exported data) means no system turn.

    Raises:
        InvalidRecord: a prompt, input or system that is not a (non-empty) string.
    """
    prompt = check_content(record[prompt_key], f"'{prompt_key}'")
    if prompt_key == "instruction" and record.get("input") is not None:
        extra = record["input"]
        if not isinstance(extra, str):
            raise InvalidRecord(Problem.NON_STRING_CONTENT, f"'input' is {type(extra).__name__}, expected a string")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    messages = [Message("user", prompt)]
    system = record.get("system")
    if system is not None and not (isinstance(system, str) and not system.strip()):
        messages.insert(0, Message("system", check_content(system, "'system'")))
    return messages


def _single_turn(record: Mapping[str, Any], pairs: list[tuple[str, str]], allow_empty_answers: bool) -> Record:
    if set(pairs) == _ALPACA_PAIRS:
        pairs = [("instruction", "output")]
    if len(pairs) > 1:
        raise InvalidRecord(
            Problem.AMBIGUOUS_FORMAT,
            f"record matches several key pairs ({', '.join(f'{p}/{a}' for p, a in pairs)}); keep the keys of exactly one",
        )
    prompt_key, answer_key = pairs[0]
    context = single_turn_context(record, prompt_key)
    answer = check_content(record[answer_key], f"'{answer_key}'", allow_empty=allow_empty_answers)
    return Record(RecordFormat.SINGLE_TURN, (*context, Message("assistant", answer)))


def _keys_of(fmt: InputFormat) -> str:
    """The keys a format needs, for messages."""
    if fmt in LIST_KEYS:
        return f"a {LIST_KEYS[fmt]!r} list"
    return {
        InputFormat.TEXT: "a 'text' string",
        InputFormat.PROMPT_COMPLETION: "'prompt' and 'completion'",
        InputFormat.ALPACA: "'instruction' and 'output' (or 'response'), optionally 'input'",
        InputFormat.SINGLE_TURN: "one of the key pairs " + ", ".join(f"{p}/{a}" for p, a in SINGLE_TURN_KEYS),
    }[fmt]


def parse_record(
    record: Any, record_format: InputFormat | str = InputFormat.AUTO, allow_empty_answers: bool = True
) -> Record:
    """Validate one decoded record and normalise it.

    Args:
        record: a JSON object (or a row of a columnar source, with its null columns left out).
        record_format: the format to read it in; `auto` detects it from the keys, any other format
            reads only that format's keys (a record with the keys of several formats is then no error).
        allow_empty_answers: accept assistant turns with no content (MFTCoder trains them as "\\n" + EOS).

    Raises:
        InvalidRecord: the record breaks the data contract (the message says how).
    """
    if not isinstance(record, Mapping):
        raise InvalidRecord(Problem.NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    fmt = InputFormat.parse(record_format)
    if fmt is InputFormat.AUTO:
        fmt = detect_format(record)
    elif not any(candidate is fmt for candidate, _ in _candidates(record)) and not (
        fmt is InputFormat.SINGLE_TURN and _single_turn_pairs(record)
    ):
        raise _unknown_format(record, f"{_keys_of(fmt)} (record_format is {fmt.value!r} for this task)")

    if fmt in LIST_KEYS:
        return Record(RecordFormat.CHAT, _conversation(record, LIST_KEYS[fmt], allow_empty_answers, "assistant"))
    if fmt is InputFormat.TEXT:
        return Record(RecordFormat.TEXT, text=check_content(record["text"], "'text'"))
    if fmt is InputFormat.PROMPT_COMPLETION:
        return _prompt_completion(record, allow_empty_answers)
    pairs = _single_turn_pairs(record)
    if fmt is InputFormat.ALPACA:
        pairs = [(p, a) for p, a in pairs if p == "instruction"] or [("instruction", "output")]
    return _single_turn(record, pairs, allow_empty_answers)


def prompt_messages(record: Any) -> list[Message]:
    """The prompt turns of a batch-inference record, ending with the user turn to answer.

    Accepted: a `chat_rounds`, `messages` or `conversations` list ending with a user turn (with a
    top-level `system` for the latter two), a `prompt` list of messages (TRL's conversational
    prompt), or a single-turn prompt with one of the keys prompt, instruction, question, query or
    input (and an optional `system`); `instruction` + `input` are joined with a blank line as in
    training (Alpaca). Other keys (ids, reference answers) are ignored.

    Raises:
        InvalidRecord: no prompt, several candidate prompts, or a conversation that is not valid.
    """
    if not isinstance(record, Mapping):
        raise InvalidRecord(Problem.NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    lists = [key for key in LIST_KEYS.values() if key in record]
    prompt_keys = [k for k in PROMPT_KEYS if k in record]
    if len(lists) + bool(prompt_keys) > 1:
        raise InvalidRecord(
            Problem.AMBIGUOUS_FORMAT,
            f"record has several prompts ({', '.join(lists + prompt_keys)}); keep the keys of exactly one format",
        )
    if lists:
        return list(_conversation(record, lists[0], True, "user"))
    if isinstance(record.get("prompt"), (list, tuple)):
        return list(_conversation(record, "prompt", True, "user"))
    if set(prompt_keys) == {"instruction", "input"}:
        prompt_key = "instruction"  # joined with its input, as in training
    elif len(prompt_keys) == 1:
        prompt_key = prompt_keys[0]
    elif not prompt_keys:
        raise InvalidRecord(
            Problem.UNKNOWN_FORMAT,
            "no prompt: expected a 'chat_rounds', 'messages' or 'conversations' list ending with a user turn, a "
            f"'prompt' list of messages, or one of the keys {', '.join(PROMPT_KEYS)}; found keys {sorted(record)}",
        )
    else:
        raise InvalidRecord(Problem.AMBIGUOUS_FORMAT, f"record has several prompt keys {prompt_keys}; keep exactly one")
    return single_turn_context(record, prompt_key)


def check_text(record: Record) -> None:
    """Raise when a record holds text that is not valid Unicode: a lone UTF-16 surrogate, which JSON's
    `\\ud800` escapes can write and no UTF-8 file (nor Arrow) can hold.

    Raises:
        InvalidRecord: naming the turn (or the text) and the character.
    """
    pieces = [(f"turn {i} ({m.role})", m.content) for i, m in enumerate(record.messages)]
    if record.text is not None:
        pieces.append(("'text'", record.text))
    for where, text in pieces:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRecord(
                Problem.INVALID_TEXT,
                f"{where} holds a lone surrogate {text[e.start]!r} at character {e.start}, which is not valid Unicode "
                "(half of a UTF-16 pair, written as a \\ud800-\\udfff escape); fix the tool that wrote it, or remove it",
            ) from None
