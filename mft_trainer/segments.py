"""Segments: the contract between a prompt format and tokenization.

A prompt format (MFTCoder's markers in `mft_trainer.rendering`, or a Jinja chat template in
`mft_trainer.template_rendering`) turns a conversation into a list of `Segment`s: pieces of text,
each trained or not. Each segment is tokenized on its own, without special tokens added, so that
the tokens of a prompt are the same whether it is the start of a training sample or a prompt sent
for generation (invariant 5 of DESIGN.md).

>>> segments = [Segment("<s>human\\nhi\\n<s>bot\\n", trained=False), Segment("yo\\n", trained=True, ends_with_eos=True)]
>>> tokenize_segments([segments], tok, eos_token_id=tok.eos_token_id)      # doctest: +SKIP
[{'input_ids': [27, 82, ..., 8226, 198, 50256], 'labels': [-100, ..., 8226, 198, 50256]}]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .constants import IGNORE_INDEX
from .records import Message, Record, RecordFormat


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation, tokenized on its own."""

    text: str
    trained: bool
    ends_with_eos: bool = False  # the format's EOS id follows the text (MFTCoder answers, text records)


@dataclass(frozen=True)
class InferencePrompt:
    """A generation prompt: its text and its token ids (exactly the training tokenization)."""

    text: str
    input_ids: list[int]


class PromptFormat(ABC):
    """How conversations become segments, for training samples and for generation prompts.

    Attributes:
        name: what the format is, for messages ("mftcoder", "the tokenizer's chat template", a path).
        eos_token_id: the id appended to segments with `ends_with_eos`.
        end_of_turn_token_id: the id that ends every trained assistant turn: generation stops at it.
        answer_suffix: text the format writes between an answer and its end-of-turn token (MFTCoder:
            a newline); it is not part of the answer's content, so generated answers drop it.
    """

    name: str
    eos_token_id: int
    end_of_turn_token_id: int
    answer_suffix: str = ""

    @abstractmethod
    def dialogue_segments(self, messages: Sequence[Message]) -> list[Segment]:
        """The segments of a validated conversation that ends with an assistant turn."""

    @abstractmethod
    def prompt_segments(self, messages: Sequence[Message]) -> list[Segment]:
        """The segments of a generation prompt: a conversation that ends with a user turn, then
        what the format puts before an answer. Equal to the training segments up to that point."""

    @abstractmethod
    def cache_key(self) -> dict[str, Any]:
        """Everything that decides the segments (part of the tokenization cache key)."""

    def single_turn_segments(self, messages: Sequence[Message]) -> list[Segment]:
        """The segments of a single-turn record (prompt/answer, ...); by default a one-round dialogue."""
        return self.dialogue_segments(messages)

    def text_segments(self, text: str) -> list[Segment]:
        """The segments of a text record: plain language-model text, `{text}\\n` + EOS, all trained."""
        return [Segment(text + "\n", trained=True, ends_with_eos=True)]

    def training_segments(self, record: Record) -> list[Segment]:
        """The segments of a validated record (chat, single-turn or text)."""
        if record.format is RecordFormat.TEXT:
            return self.text_segments(record.text or "")
        if record.format is RecordFormat.CHAT:
            return self.dialogue_segments(record.messages)
        return self.single_turn_segments(record.messages)

    def batch_training_segments(self, records: Sequence[Record]) -> list[list[Segment]]:
        """`training_segments` of many records (formats may render them together, faster)."""
        return [self.training_segments(record) for record in records]

    def inference_prompt(self, messages: Sequence[Message], tokenizer: Any) -> InferencePrompt:
        """The prompt for the next assistant turn: its text and exactly its training token ids."""
        segments = self.prompt_segments(messages)
        eos_text = tokenizer.decode([self.eos_token_id])  # the text that tokenizes back to EOS
        text = "".join(s.text + (eos_text if s.ends_with_eos else "") for s in segments)
        input_ids = tokenize_segments([segments], tokenizer, self.eos_token_id)[0]["input_ids"]
        return InferencePrompt(text=text, input_ids=input_ids)

    def answer_text(self, text: str) -> str:
        """A generated answer (decoded up to the end-of-turn token) as a turn's content."""
        if self.answer_suffix and text.endswith(self.answer_suffix):
            return text[: -len(self.answer_suffix)]
        return text


def resolve_eos_token_id(tokenizer: Any, eos_token: str | None = None) -> int:
    """The EOS id: the tokenizer's, or the id of `eos_token`."""
    if eos_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(eos_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token):
            raise ValueError(f"eos_token {eos_token!r} is not a single token of the tokenizer's vocabulary")
        return int(token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set eos_token to the token that ends an assistant turn")
    return int(tokenizer.eos_token_id)


def padding_token_id(tokenizer: Any, fallback: int | None = None) -> int:
    """The id batches are padded with: the tokenizer's pad token, else `fallback` (an end-of-turn id),
    else its EOS token. Any id serves, since padded positions are masked out (MFTCoder pads with EOS).

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token, and no fallback is given.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if fallback is not None:
        return int(fallback)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "the tokenizer has neither a pad nor an EOS token; set eos_token in the data settings, or pass a "
        "data_collator with a pad_token_id"
    )


def tokenize_segments(
    samples: Sequence[Sequence[Segment]], tokenizer: Any, eos_token_id: int
) -> list[dict[str, list[int]]]:
    """Tokenize many samples' segments in one tokenizer call; return input_ids and labels per sample.

    Position 0 never carries a label: nothing before it predicts it (a text sample's first token
    is therefore counted as untrained).
    """
    flat_texts = [segment.text for segments in samples for segment in segments]
    # Only the ids: building attention masks and token type ids took ~40% of the tokenizer call.
    flat_ids = tokenizer(
        flat_texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"] if flat_texts else []
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
