"""Prompts in a Jinja chat template: the model's own (`chat_template: model`) or a `.jinja` file.

The template renders the conversation, so the fine-tuned model keeps speaking it and every server
that uses `apply_chat_template` (vLLM, TGI, ...) prompts it exactly as it was trained. The loss mask
does not rely on `{% generation %}` markers (most templates have none). For each assistant turn k at
message i the template renders two prefixes of the conversation:

    prompt_k = render(messages[:i], add_generation_prompt=True)    what inference sends before turn k
    full_k   = render(messages[:i + 1])                            the same, with turn k's answer

`full_k[len(prompt_k):]` is the answer span: the content, then the template's end-of-turn marker
(`<|im_end|>`, `<|eot_id|>`, EOS, ...), then what the template writes after it (often a newline).
The content and the marker are trained; everything else (the system prompt, the template's default
system prompt, role headers, the newline after the marker) is not. The segments are tokenized one by
one, so the tokens before turn k are exactly the tokens of prompt_k that inference sends.

This needs the prefix property: prompt_k starts with full_{k-1} and full_k starts with prompt_k. A
template that breaks it (one that rewrites earlier turns, such as dropping the reasoning of past
assistant turns, or writes the current date) is refused with a `ChatTemplateError` naming the
template and the turn, never trained with a wrong mask.

>>> fmt = TemplateFormat(tok, tok.chat_template, name="the tokenizer's chat template")  # doctest: +SKIP
>>> fmt.end_of_turn, fmt.end_of_turn_token_id                                           # doctest: +SKIP
('<|im_end|>', 2)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from unittest import mock

from jinja2.exceptions import TemplateError

from .records import Message, Record, RecordFormat
from .segments import PromptFormat, Segment, resolve_eos_token_id

# The probe conversation that shows what a template writes around an assistant's content.
_PROBE_QUESTION = "mft-probe-question"
_PROBE_ANSWER = "mft-probe-answer"


class ChatTemplateError(ValueError):
    """A chat template that cannot be trained with as asked; the message names the template and why.

    `record_index` is the index, in the batch being rendered, of the record it happened on (None
    when it is about the template itself).
    """

    def __init__(self, message: str, record_index: int | None = None):
        super().__init__(message)
        self.record_index = record_index


class _ConversationError(Exception):
    """The template raised on conversation `index` of a batch."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _first_difference(a: str, b: str) -> str:
    """Where two texts part, for error messages."""
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {at}: {a[max(0, at - 30):at + 30]!r} vs {b[max(0, at - 30):at + 30]!r}"


class TemplateFormat(PromptFormat):
    """A conversation rendered by a Jinja chat template, masked turn by turn (module docstring).

    Args:
        tokenizer: the tokenizer that renders (`apply_chat_template`) and tokenizes.
        template: the Jinja source.
        name: what the template is, for messages ("the tokenizer's chat template", a file path).
        eos_token: the EOS of text records (default the tokenizer's); assistant turns end with what
            the template writes.

    Raises:
        ChatTemplateError: the template writes no end-of-turn marker after an answer, the marker
            is not one token that generation can stop at, or the template writes the current date.
    """

    def __init__(self, tokenizer: Any, template: str, name: str, eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        self.eos_token_id = resolve_eos_token_id(tokenizer, eos_token)
        self.end_of_turn, self.end_of_turn_token_id, self.answer_suffix = self._probe_end_of_turn()
        self._refuse_dates()

    # ---- rendering ------------------------------------------------------------------------------

    def _render(self, conversations: list[list[dict[str, str]]], add_generation_prompt: bool) -> list[str]:
        """Render conversations in one call; on a template error, say which conversation raised."""
        if not conversations:
            return []

        def render(batch):
            return self.tokenizer.apply_chat_template(
                batch, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )

        try:
            return render(conversations)
        except TemplateError:
            for index, conversation in enumerate(conversations):
                try:
                    render([conversation])
                except TemplateError as e:
                    raise _ConversationError(index, str(e)) from None
            raise

    def _render_one(self, conversation: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._render([conversation], add_generation_prompt)[0]
        except _ConversationError as e:
            raise ChatTemplateError(f"{self.name} raised an error: {e}") from None

    def _probe_end_of_turn(self) -> tuple[str, int, str]:
        """What the template writes after an answer: the end-of-turn marker (trained), its token id
        (generation stops there) and the text between the content and that token."""
        conversation = [{"role": "user", "content": _PROBE_QUESTION}, {"role": "assistant", "content": _PROBE_ANSWER}]
        prompt = self._render_one(conversation[:1], add_generation_prompt=True)
        full = self._render_one(conversation, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"{self.name}: a one-round conversation does not start with its generation prompt "
                f"({_first_difference(prompt, full)}), so the prompt sent for generation would differ from "
                "the trained text; check how the template handles add_generation_prompt"
            )
        span = full[len(prompt):]
        at = span.find(_PROBE_ANSWER)
        if at < 0:
            raise ChatTemplateError(f"{self.name} does not write an assistant's content as given: {span!r}")
        after = span[at + len(_PROBE_ANSWER):]
        end_of_turn = after.rstrip()
        if not end_of_turn:
            raise ChatTemplateError(
                f"{self.name} writes nothing after an assistant's content (it renders {span!r}), so a model "
                "trained with it would never learn to stop; use a template that ends assistant turns with a "
                "token such as its EOS (chat_template: path/to/template.jinja)"
            )
        ids = self.tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        candidates = [i for i in ids if i in special]
        if candidates:
            token_id = candidates[-1]
        elif len(ids) == 1:
            token_id = ids[0]
        else:
            raise ChatTemplateError(
                f"{self.name} ends assistant turns with {end_of_turn!r}, which is {len(ids)} tokens and none of "
                "them a special token: generation could not stop at it. Add it to the tokenizer as a special "
                "token, or use a template whose end-of-turn marker is one"
            )
        token_text = self.tokenizer.decode([token_id])
        answer_suffix = end_of_turn[: end_of_turn.rfind(token_text)] if token_text in end_of_turn else ""
        return end_of_turn, int(token_id), answer_suffix

    def _refuse_dates(self) -> None:
        """Refuse a template that writes the current date (`strftime_now`): the text trained today
        would not be the text a server prompts with on another day."""
        from transformers.utils import chat_template_utils

        conversation = [{"role": "user", "content": _PROBE_QUESTION}, {"role": "assistant", "content": _PROBE_ANSWER}]
        if not hasattr(chat_template_utils, "datetime"):  # transformers changed how it tells the time
            differs = "strftime_now" in self.template
        else:
            renders = []
            for day in (datetime(2001, 1, 1), datetime(2002, 2, 2)):
                clock = type("Clock", (datetime,), {"now": classmethod(lambda cls, tz=None, _day=day: _day)})
                with mock.patch.object(chat_template_utils, "datetime", clock):
                    renders.append(self._render_one(conversation, add_generation_prompt=False))
            differs = renders[0] != renders[1]
        if differs:
            raise ChatTemplateError(
                f"{self.name} writes the current date into the prompt (strftime_now), so the text trained today "
                "differs from the text a server prompts with on another day, and the turns cannot be masked "
                "consistently. Use a copy of the template with a fixed date (chat_template: path/to/template.jinja)"
            )

    # ---- segments -------------------------------------------------------------------------------

    def _trained_length(self, span: str, content: str, turn: int) -> int:
        """How much of an answer span is trained: up to and including the end-of-turn marker."""
        at, length = span.find(content), len(content)
        if at < 0:  # templates often trim contents
            at, length = span.find(content.strip()), len(content.strip())
        if at < 0:
            raise ChatTemplateError(
                f"{self.name} does not write assistant turn {turn}'s content as given (rendered: {span[:200]!r}); "
                "only templates that keep answers verbatim (or trimmed) can be masked"
            )
        marker = span.find(self.end_of_turn, at + length)
        if marker < 0:
            raise ChatTemplateError(
                f"{self.name} does not end assistant turn {turn} with its end-of-turn marker {self.end_of_turn!r} "
                f"(rendered: {span[-200:]!r})"
            )
        return marker + len(self.end_of_turn)

    def _assemble(
        self, messages: Sequence[Message], prompts: Sequence[str], fulls: Sequence[str], final_prompt: str | None
    ) -> list[Segment]:
        """The segments of one conversation from its rendered prefixes (module docstring)."""
        assistant_turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
        pieces: list[tuple[str, bool, bool]] = []  # (text, trained, is an answer span)
        done = ""  # the text the pieces cover so far
        for turn, (index, prompt, full) in enumerate(zip(assistant_turns, prompts, fulls)):
            if not prompt.startswith(done):
                raise self._rewrite_error(turn, "the generation prompt of this turn", done, prompt)
            if not full.startswith(prompt):
                raise self._rewrite_error(turn, "the conversation with this turn's answer", prompt, full)
            span = full[len(prompt):]
            trained = self._trained_length(span, messages[index].content, turn)
            pieces += [
                (prompt[len(done):], False, False),
                (span[:trained], messages[index].trained, True),
                (span[trained:], False, False),
            ]
            done = full
        if final_prompt is not None:
            if not final_prompt.startswith(done):
                raise self._rewrite_error(len(assistant_turns), "the generation prompt", done, final_prompt)
            pieces.append((final_prompt[len(done):], False, False))
        # Adjacent untrained pieces (the newline after a marker, the next user turn) are one segment,
        # tokenized as the whole text would be. An answer span is always a segment of its own, also
        # when it is not trained (context turns of a prompt/completion record), so that the tokens
        # before every turn are those of the prompt inference sends.
        segments: list[Segment] = []
        previous_is_answer = False
        for text, trained, is_answer in pieces:
            if not text:
                continue
            if segments and not trained and not segments[-1].trained and not is_answer and not previous_is_answer:
                segments[-1] = Segment(segments[-1].text + text, trained=False)
            else:
                segments.append(Segment(text, trained=trained))
            previous_is_answer = is_answer
        return segments

    def _rewrite_error(self, turn: int, what: str, before: str, after: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"{self.name} breaks the prefix property at assistant turn {turn}: {what} does not start with the "
            f"conversation as rendered before it ({_first_difference(before, after)}). The template rewrites "
            "earlier turns (e.g. it drops the reasoning of past assistant turns) or changes from call to call, "
            "so no mask would be right; train single-turn records, or use a template that renders every turn "
            "the same way (chat_template: path/to/template.jinja)"
        )

    def _segments_of(self, conversations: Sequence[Sequence[Message]], for_generation: bool) -> list[list[Segment]]:
        """Render the prefixes of many conversations in two template calls, then assemble each."""
        dicts = [_as_dicts(messages) for messages in conversations]
        owners, prompt_requests, full_requests = [], [], []
        for owner, messages in enumerate(dicts):
            for index, message in enumerate(messages):
                if message["role"] == "assistant":
                    owners.append(owner)
                    prompt_requests.append(messages[:index])
                    full_requests.append(messages[: index + 1])
            if for_generation:
                owners.append(owner)
                prompt_requests.append(messages)
        try:
            prompts = self._render(prompt_requests, add_generation_prompt=True)
            fulls = self._render(full_requests, add_generation_prompt=False)
        except _ConversationError as e:
            # Both lists list the prefixes conversation by conversation, so the owners agree.
            owner = owners[e.index] if e.index < len(owners) else None
            raise ChatTemplateError(f"{self.name} raised an error: {e}", record_index=owner) from None
        results = []
        prompt_cursor = full_cursor = 0
        for owner, messages in enumerate(conversations):
            turns = sum(m.role == "assistant" for m in messages)
            own_prompts = prompts[prompt_cursor : prompt_cursor + turns]
            own_fulls = fulls[full_cursor : full_cursor + turns]
            prompt_cursor += turns
            full_cursor += turns
            final = None
            if for_generation:
                final = prompts[prompt_cursor]
                prompt_cursor += 1
            try:
                results.append(self._assemble(messages, own_prompts, own_fulls, final))
            except ChatTemplateError as e:
                e.record_index = owner
                raise
        return results

    def dialogue_segments(self, messages: Sequence[Message]) -> list[Segment]:
        return self._segments_of([messages], for_generation=False)[0]

    def prompt_segments(self, messages: Sequence[Message]) -> list[Segment]:
        return self._segments_of([messages], for_generation=True)[0]

    def batch_training_segments(self, records: Sequence[Record]) -> list[list[Segment]]:
        dialogues = [i for i, r in enumerate(records) if r.format is not RecordFormat.TEXT]
        try:
            rendered = iter(self._segments_of([records[i].messages for i in dialogues], for_generation=False))
        except ChatTemplateError as e:
            if e.record_index is not None:
                e.record_index = dialogues[e.record_index]
            raise
        return [self.text_segments(r.text or "") if r.format is RecordFormat.TEXT else next(rendered) for r in records]

    def cache_key(self) -> dict[str, Any]:
        return {
            "format": "template",
            "template_sha256": hashlib.sha256(self.template.encode()).hexdigest(),
            "eos_token_id": self.eos_token_id,
        }
