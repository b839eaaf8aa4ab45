"""The prompt format: one renderer for training samples and inference prompts (invariant 5).

A conversation is rendered as a list of segments, each tokenized on its own without special tokens
(as MFTCoder does, so token ids match it exactly), each either trained or not:

    <s>system\\n{system}\\n                 untrained   (chat: its own segment)
    <s>human\\n{q}\\n<s>bot\\n                untrained
    {a}\\n + [EOS]                          trained     (the answer, then the end of the turn)
    \\n                                    untrained   (separates rounds; not part of the answer)

A single-turn record (prompt/answer, ...) is two segments, as in MFTCoder:
`[<s>system\\n{system}\\n]<s>human\\n{prompt}\\n<s>bot\\n` untrained, then `{answer}\\n` + [EOS] trained.
A text record is one segment `{text}\\n` + [EOS], all trained.

>>> from transformers import AutoTokenizer                                   # doctest: +SKIP
>>> tok = AutoTokenizer.from_pretrained("examples/tokenizers/gpt2")          # doctest: +SKIP
>>> render_conversation({"chat_rounds": [{"role": "human", "content": "hi"},
...                                      {"role": "bot", "content": "yo"}]}, tok)  # doctest: +SKIP
{'input_ids': [27, 82, 29, 10734, 198, 5303, 198, 27, 82, 29, 13645, 198, 8226, 198, 50256, 198],
 'labels': [-100, ..., -100, 8226, 198, 50256, -100]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .constants import IGNORE_INDEX
from .records import Message, Record, RecordFormat, parse_messages, parse_record


@dataclass(frozen=True)
class RoleMarkers:
    """The strings that open each turn. The defaults are MFTCoder's."""

    system: str = "<s>system\n"
    user: str = "<s>human\n"
    assistant: str = "<s>bot\n"

    @classmethod
    def from_config(cls, value: RoleMarkers | Mapping[str, str] | None) -> RoleMarkers:
        """Accept None (defaults), a RoleMarkers, or a mapping with keys system/user/assistant
        (human and bot are accepted as spellings of user and assistant)."""
        if value is None:
            return cls()
        if isinstance(value, RoleMarkers):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"role_markers must be a mapping with keys system/user/assistant, got {value!r}")
        spellings = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "bot": "assistant"}
        unknown = sorted(set(value) - set(spellings))
        if unknown:
            raise ValueError(
                f"role_markers has unknown key(s) {unknown}; expected system, user (or human), assistant (or bot), "
                'e.g. {"system": "<s>system\\n", "user": "<s>human\\n", "assistant": "<s>bot\\n"}'
            )
        markers = {}
        for key, marker in value.items():
            if not isinstance(marker, str):
                raise TypeError(f"role_markers[{key!r}] must be a string, got {marker!r}")
            markers[spellings[key]] = marker
        return cls(**markers)

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation, tokenized on its own."""

    text: str
    trained: bool
    ends_with_eos: bool = False


def format_content(content: str) -> str:
    """Content as it appears in the prompt: non-breaking spaces made plain (as MFTCoder does, so
    that the model never has to learn two spellings of a space) and a trailing newline."""
    return content.replace("\u202f", " ").replace("\xa0", " ") + "\n"


def _dialogue_segments(messages: Sequence[Message], markers: RoleMarkers) -> list[Segment]:
    segments = []
    for message in messages:
        if message.role == "system":
            segments.append(Segment(markers.system + format_content(message.content), trained=False))
        elif message.role == "user":
            segments.append(Segment(markers.user + format_content(message.content) + markers.assistant, trained=False))
        else:
            # The answer and the EOS that ends it are trained; the newline after EOS is not, so
            # the model learns to stop and never to predict what follows its turn.
            segments.append(Segment(format_content(message.content), trained=True, ends_with_eos=True))
            segments.append(Segment("\n", trained=False))
    return segments


def record_segments(record: Record, markers: RoleMarkers) -> list[Segment]:
    """The segments of a validated record, per the prompt format above."""
    if record.format is RecordFormat.TEXT:
        return [Segment(format_content(record.text or ""), trained=True, ends_with_eos=True)]
    if record.format is RecordFormat.CHAT:
        return _dialogue_segments(record.messages, markers)
    # Single-turn: the system prompt and the question form one untrained segment, as in MFTCoder.
    *context, answer = record.messages
    prompt = "".join(s.text for s in _dialogue_segments(context, markers))
    return [Segment(prompt, trained=False), Segment(format_content(answer.content), trained=True, ends_with_eos=True)]


def resolve_eos_token_id(tokenizer: Any, eos_token: str | None = None) -> int:
    """The EOS id that ends every assistant turn: the tokenizer's, or the id of `eos_token`."""
    if eos_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(eos_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token):
            raise ValueError(f"eos_token {eos_token!r} is not a single token of the tokenizer's vocabulary")
        return int(token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set eos_token to the token that ends an assistant turn")
    return int(tokenizer.eos_token_id)


def tokenize_segments(
    samples: Sequence[Sequence[Segment]], tokenizer: Any, eos_token_id: int
) -> list[dict[str, list[int]]]:
    """Tokenize many samples' segments in one tokenizer call; return input_ids and labels per sample.

    Position 0 never carries a label: nothing before it predicts it (a text sample's first token
    is therefore counted as untrained).
    """
    flat_texts = [segment.text for segments in samples for segment in segments]
    flat_ids = tokenizer(flat_texts, add_special_tokens=False)["input_ids"] if flat_texts else []
    rendered = []
    cursor = 0
    for segments in samples:
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            ids = list(flat_ids[cursor])
            cursor += 1
            if segment.ends_with_eos:
                ids.append(eos_token_id)
            input_ids += ids
            labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
        if labels:
            labels[0] = IGNORE_INDEX
        rendered.append({"input_ids": input_ids, "labels": labels})
    return rendered


def render_conversation(
    record: Mapping[str, Any],
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> dict[str, list[int]]:
    """Render one jsonl record into `{"input_ids": [...], "labels": [...]}`, labels -100 where no loss.

    Args:
        record: a decoded jsonl record in any accepted format (chat_rounds, single-turn, text).
        tokenizer: a Hugging Face tokenizer.
        role_markers: the turn markers (default MFTCoder's `<s>system\\n`, `<s>human\\n`, `<s>bot\\n`).
        eos_token: the token that ends an assistant turn (default: the tokenizer's EOS).

    Raises:
        InvalidRecord: the record breaks the data contract (the message says how).
    """
    segments = record_segments(parse_record(record), RoleMarkers.from_config(role_markers))
    return tokenize_segments([segments], tokenizer, resolve_eos_token_id(tokenizer, eos_token))[0]


@dataclass(frozen=True)
class InferencePrompt:
    """A generation prompt: its text and its token ids (exactly the training tokenization)."""

    text: str
    input_ids: list[int]


def build_inference_prompt(
    messages: Sequence[Mapping[str, str]] | Mapping[str, Any],
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> InferencePrompt:
    """Build the prompt for the next assistant turn of a conversation that ends with a user turn.

    The ids equal the training ids of the same conversation up to where the answer starts.

    >>> build_inference_prompt([{"role": "human", "content": "hi"}], tok).text   # doctest: +SKIP
    '<s>human\\nhi\\n<s>bot\\n'

    Args:
        messages: the turns (`[{"role", "content"}, ...]`, roles as in `chat_rounds`), or a record
            with a `chat_rounds` key.
    """
    if isinstance(messages, Mapping):
        messages = messages.get("chat_rounds", messages.get("messages"))
    parsed = parse_messages(list(messages) if messages is not None else None, last_role="user")
    segments = _dialogue_segments(parsed, RoleMarkers.from_config(role_markers))
    eos_token_id = resolve_eos_token_id(tokenizer, eos_token)
    eos_text = tokenizer.decode([eos_token_id])  # the text that tokenizes back to EOS (not its vocab spelling)
    text = "".join(s.text + (eos_text if s.ends_with_eos else "") for s in segments)
    input_ids = tokenize_segments([segments], tokenizer, eos_token_id)[0]["input_ids"]
    return InferencePrompt(text=text, input_ids=input_ids)
