"""The MFTCoder prompt format (`chat_template: mftcoder`, the default), token for token as MFTCoder.

A conversation is rendered as a list of segments (`mft_trainer.segments`), each tokenized on its own
without special tokens (as MFTCoder does, so token ids match it exactly), each either trained or not:

    <s>system\\n{system}\\n                 untrained   (chat: its own segment)
    <s>human\\n{q}\\n<s>bot\\n                untrained
    {a}\\n + [EOS]                          trained     (the answer, then the end of the turn)
    \\n                                    untrained   (separates rounds; not part of the answer)

A single-turn record (prompt/answer, ...) is two segments, as in MFTCoder:
`[<s>system\\n{system}\\n]<s>human\\n{prompt}\\n<s>bot\\n` untrained, then `{answer}\\n` + [EOS] trained.
A text record is one segment `{text}\\n` + [EOS], all trained.

>>> fmt = MFTCoderFormat(RoleMarkers(), eos_token_id=50256)
>>> [(s.text, s.trained) for s in fmt.dialogue_segments([Message("user", "hi"), Message("assistant", "yo")])]
[('<s>human\\nhi\\n<s>bot\\n', False), ('yo\\n', True), ('\\n', False)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .records import ROLE_ALIASES, ROLE_SPELLINGS, Message, Record
from .segments import PromptFormat, Segment


@dataclass(frozen=True)
class RoleMarkers:
    """The strings that open each turn. The defaults are MFTCoder's."""

    system: str = "<s>system\n"
    user: str = "<s>human\n"
    assistant: str = "<s>bot\n"

    @classmethod
    def from_config(cls, value: RoleMarkers | Mapping[str, str] | None) -> RoleMarkers:
        """Accept None (defaults), a RoleMarkers, or a mapping with keys system/user/assistant (any
        spelling the data accepts: human for user, bot or gpt for assistant; `records.ROLE_ALIASES`)."""
        if value is None:
            return cls()
        if isinstance(value, RoleMarkers):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"role_markers must be a mapping with keys system/user/assistant, got {value!r}")
        unknown = sorted(key for key in value if key not in ROLE_ALIASES)
        if unknown:
            raise ValueError(
                f"role_markers has unknown key(s) {unknown}; expected system, user, assistant (spelled as in the data: "
                f'{ROLE_SPELLINGS}), e.g. {{"system": "<s>system\\n", "user": "<s>human\\n", "assistant": "<s>bot\\n"}}'
            )
        markers = {}
        for key, marker in value.items():
            if not isinstance(marker, str):
                raise TypeError(f"role_markers[{key!r}] must be a string, got {marker!r}")
            markers[ROLE_ALIASES[key]] = marker
        return cls(**markers)

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def format_content(content: str) -> str:
    """Content as it appears in the prompt: non-breaking spaces made plain (as MFTCoder does, so
    that the model never has to learn two spellings of a space) and a trailing newline."""
    return content.replace("\u202f", " ").replace("\xa0", " ") + "\n"


class MFTCoderFormat(PromptFormat):
    """MFTCoder's prompt format with these role markers; every answer ends with `eos_token_id`."""

    answer_suffix = "\n"  # every answer is `{content}\n` + EOS

    def __init__(self, markers: RoleMarkers, eos_token_id: int):
        self.name = "mftcoder"
        self.markers = markers
        self.eos_token_id = eos_token_id
        self.end_of_turn_token_id = eos_token_id

    def _turn_segments(self, messages: Sequence[Message]) -> list[Segment]:
        segments = []
        for message in messages:
            if message.role == "system":
                segments.append(Segment(self.markers.system + format_content(message.content), trained=False))
            elif message.role == "user":
                text = self.markers.user + format_content(message.content) + self.markers.assistant
                segments.append(Segment(text, trained=False))
            else:
                # The answer and the EOS that ends it are trained (unless the turn is context, as in a
                # prompt/completion record's prompt); the newline after EOS is not, so the model
                # learns to stop and never to predict what follows its turn.
                segments.append(Segment(format_content(message.content), trained=message.trained, ends_with_eos=True))
                segments.append(Segment("\n", trained=False))
        return segments

    def dialogue_segments(self, messages: Sequence[Message]) -> list[Segment]:
        return self._turn_segments(messages)

    def prompt_segments(self, messages: Sequence[Message]) -> list[Segment]:
        return self._turn_segments(messages)

    def single_turn_segments(self, messages: Sequence[Message]) -> list[Segment]:
        # The system prompt and the question form one untrained segment, and no newline follows the
        # answer, as in MFTCoder.
        *context, answer = messages
        prompt = "".join(s.text for s in self._turn_segments(context))
        return [Segment(prompt, trained=False), Segment(format_content(answer.content), trained=True, ends_with_eos=True)]

    def text_segments(self, text: str) -> list[Segment]:
        return [Segment(format_content(text), trained=True, ends_with_eos=True)]

    def cache_key(self) -> dict[str, Any]:
        return {"format": self.name, "role_markers": self.markers.to_dict(), "eos_token_id": self.eos_token_id}


def record_segments(record: Record, markers: RoleMarkers) -> list[Segment]:
    """The MFTCoder segments of a validated record (the EOS id is added at tokenization)."""
    return MFTCoderFormat(markers, eos_token_id=-1).training_segments(record)
