"""Generation prompted exactly as in training (invariant 5): decoding options, answers, multi-round chat.

Prompts are built by the run's prompt format (`chat_template`: MFTCoder's markers, the model's own
template or a template file), the renderer used for training, and passed to `model.generate` as
token ids, so the model sees the training tokens and nothing else. Generation stops at the
end-of-turn token that ends every trained answer (the EOS in MFTCoder's format, `<|im_end|>`,
`<|eot_id|>`, ... in a template); the answer text excludes the prompt, that token and what the format
writes before it (MFTCoder's newline), so that it can go back into the history as the assistant's
content and render to the same bytes the model produced.

- `generate_answers`: answers for many conversations, in batches (left-padded; the tokenizer needs
  no pad token).
- `generate_from_prompts`: the same for prompts already built (`build_inference_prompt`).
- `ChatSession`: a multi-round conversation that keeps its history.

>>> from mft_trainer import load_model_and_tokenizer                              # doctest: +SKIP
>>> model, tokenizer = load_model_and_tokenizer("output/run1")                    # doctest: +SKIP
>>> chat = ChatSession(model, tokenizer, GenerationOptions(max_new_tokens=256))   # doctest: +SKIP
>>> chat.ask("Write a Python function that reverses a string.").text              # doctest: +SKIP
'def reverse(s):\\n    return s[::-1]'
>>> chat.ask("Now in C.").text  # the first round is part of this prompt          # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .prompt_format import ChatTemplateMode, build_inference_prompt, get_prompt_format
from .rendering import RoleMarkers
from .segments import InferencePrompt, PromptFormat, padding_token_id

logger = logging.getLogger(__name__)


# The values of the sampling options that leave the distribution as the model gives it.
_SAMPLING_OFF = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass
class GenerationOptions:
    """How to decode. Greedy by default; `do_sample=True` samples with `temperature`/`top_p`/`top_k`;
    `num_beams > 1` is beam search (with or without sampling).

    >>> GenerationOptions(max_new_tokens=128, do_sample=True, temperature=0.2, top_p=0.95)  # doctest: +SKIP
    """

    max_new_tokens: int = field(default=512, metadata={"help": "most tokens to generate per answer"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy/beam decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling probability mass (with do_sample)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens, 0 = all (with do_sample)"})
    num_beams: int = field(default=1, metadata={"help": "beam search with this many beams (1 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty for repeated tokens (1.0 = off)"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (greedy decoding is do_sample=False)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        sampling_set = [name for name, off in _SAMPLING_OFF.items() if getattr(self, name) != off]
        if sampling_set and not self.do_sample:
            # Without this, setting a temperature would silently decode greedily.
            raise ValueError(
                f"{', '.join(sampling_set)} set but sampling is off: set do_sample=True (--do_sample), "
                "or leave the sampling options at their defaults for greedy or beam decoding"
            )

    def generation_config(self, eos_token_id: int, pad_token_id: int) -> Any:
        """A `transformers.GenerationConfig` with these options, stopping at `eos_token_id` only."""
        from transformers import GenerationConfig

        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            # The trained answers end with this EOS; the model's own generation_config may list others.
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
        text: the answer, without the prompt, the EOS, and the newline that ends every turn.
        token_ids: the generated ids, up to and including the EOS when there is one.
        stopped_at_eos: False when generation hit `max_new_tokens` first (the answer is cut short).
    """

    text: str
    token_ids: list[int]
    stopped_at_eos: bool


def _answer(new_ids: Sequence[int], tokenizer: Any, prompt_format: PromptFormat) -> Generation:
    new_ids = list(new_ids)
    end_of_turn = prompt_format.end_of_turn_token_id
    stopped = end_of_turn in new_ids
    answer_ids = new_ids[: new_ids.index(end_of_turn)] if stopped else new_ids
    text = tokenizer.decode(answer_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if stopped:
        # What the format writes between the content and the end-of-turn token (MFTCoder's `\n`)
        # belongs to the format, not the content.
        text = prompt_format.answer_text(text)
    return Generation(text=text, token_ids=new_ids[: len(answer_ids) + stopped], stopped_at_eos=stopped)


def resolve_prompt_format(
    tokenizer: Any,
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> PromptFormat:
    """`chat_template` itself when it is a `PromptFormat`, else the format it names."""
    if isinstance(chat_template, PromptFormat):
        return chat_template
    return get_prompt_format(tokenizer, chat_template, role_markers, eos_token)


@torch.no_grad()
def generate_from_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[InferencePrompt],
    options: GenerationOptions | None = None,
    prompt_format: PromptFormat | None = None,
) -> list[Generation]:
    """Generate one answer per prompt, all in one `generate` call (left-padded).

    Args:
        prompts: from `build_inference_prompt`; their `input_ids` go to the model unchanged.
        prompt_format: the format the prompts are in; its end-of-turn token ends an answer
            (default MFTCoder's format, which ends answers with the tokenizer's EOS).
    """
    if not prompts:
        return []
    options = options or GenerationOptions()
    prompt_format = prompt_format or get_prompt_format(tokenizer)
    eos_token_id = prompt_format.end_of_turn_token_id
    pad_token_id = padding_token_id(tokenizer, fallback=eos_token_id)
    width = max(len(p.input_ids) for p in prompts)
    # Left padding, so that every row's next token follows its prompt directly.
    input_ids = torch.tensor([[pad_token_id] * (width - len(p.input_ids)) + p.input_ids for p in prompts])  # [B, L]
    attention_mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    device = model.device
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=options.generation_config(eos_token_id, pad_token_id),
    )  # [B, L + new]
    return [_answer(row[width:].tolist(), tokenizer, prompt_format) for row in output]


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]] | Mapping[str, Any]],
    options: GenerationOptions | None = None,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    batch_size: int = 8,
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> list[Generation]:
    """Answer the last user turn of each conversation.

    Args:
        conversations: lists of `{"role", "content"}` turns ending with a user turn (roles as in
            `chat_rounds`), or records in any record format without their answer (as
            `build_inference_prompt` reads them).
        options: decoding options (default greedy, 512 new tokens).
        role_markers, eos_token, chat_template: the prompt format, as in training (`DataConfig`); the
            defaults are MFTCoder's markers and the tokenizer's EOS. `chat_template` may also be a
            `PromptFormat`.
        batch_size: conversations per `generate` call.

    Raises:
        InvalidRecord: a conversation is not a valid prompt (the message says which rule it breaks).

    >>> generate_answers(model, tok, [[{"role": "user", "content": "hi"}]])[0].text   # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    prompts = [build_inference_prompt(c, tokenizer, chat_template=prompt_format) for c in conversations]
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        results += generate_from_prompts(model, tokenizer, prompts[start : start + batch_size], options, prompt_format)
    return results


class ChatSession:
    """A multi-round chat: each question is asked with the whole conversation so far as its prompt.

    >>> chat = ChatSession(model, tok, system="You are a careful programmer.")       # doctest: +SKIP
    >>> chat.ask("What does `git rebase` do?").text                                  # doctest: +SKIP
    >>> chat.reset()  # forget the rounds, keep the system prompt                    # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        options: GenerationOptions | None = None,
        system: str | None = None,
        role_markers: RoleMarkers | Mapping[str, str] | None = None,
        eos_token: str | None = None,
        chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or GenerationOptions()
        self.system = system
        self.prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
        self.history: list[dict[str, str]] = []

    def messages(self, question: str) -> list[dict[str, str]]:
        """The turns of the next prompt: system prompt, the rounds so far, then `question`."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": question}]

    def prompt(self, question: str) -> InferencePrompt:
        """The prompt that `ask(question)` would give the model."""
        return build_inference_prompt(self.messages(question), self.tokenizer, chat_template=self.prompt_format)

    def ask(self, question: str) -> Generation:
        """Answer `question` in the context of the conversation so far, and add the round to it.

        Raises:
            InvalidRecord: the question is empty.
        """
        generation = generate_from_prompts(
            self.model, self.tokenizer, [self.prompt(question)], self.options, self.prompt_format
        )[0]
        if generation.text.strip():
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": generation.text}]
        else:
            # An empty answer cannot be rendered (the format has no empty turns), so the round is not
            # kept; the conversation goes on from the previous round.
            logger.warning("the model gave an empty answer; this round is not kept in the history")
        return generation

    def reset(self) -> None:
        """Forget the rounds so far (the system prompt stays)."""
        self.history = []
