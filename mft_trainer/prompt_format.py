"""The prompt format of a run (`chat_template`), and the two entry points that use it.

`chat_template` chooses how conversations are written, in training and at inference alike:

- `mftcoder` (default): MFTCoder's `<s>human` / `<s>bot` markers, token for token as MFTCoder
  (`mft_trainer.rendering`); the saved tokenizer gets a Jinja template that reproduces it.
- `model`: the tokenizer's own chat template (ChatML, Llama-3 headers, ...), so the model keeps
  speaking it (`mft_trainer.template_rendering`); the saved tokenizer keeps it as it was.
- a path to a `.jinja` file: that template, installed on the saved tokenizer.

>>> fmt = get_prompt_format(tok, chat_template="model")                                 # doctest: +SKIP
>>> render_conversation({"messages": [...]}, tok, chat_template="model")               # doctest: +SKIP
>>> build_inference_prompt([{"role": "user", "content": "hi"}], tok, chat_template="model").text  # doctest: +SKIP
'<|im_start|>system\\nYou are a helpful AI assistant ...<|im_end|>\\n<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from .formats import parse_record, prompt_messages
from .records import parse_messages
from .rendering import MFTCoderFormat, RoleMarkers
from .segments import InferencePrompt, PromptFormat, resolve_eos_token_id, tokenize_segments
from .template_rendering import ChatTemplateError, TemplateFormat


class ChatTemplateMode(str, Enum):
    """The named values of `chat_template`; any other value is the path of a .jinja file."""

    MFTCODER = "mftcoder"
    MODEL = "model"


def check_chat_template_setting(chat_template: str, role_markers: Any = None) -> str:
    """Validate a `chat_template` value (without a tokenizer) and return it; a path must exist.

    Raises:
        ValueError: an empty value, a missing template file, or role_markers with a template mode.
    """
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise ValueError(f"chat_template must be 'mftcoder', 'model' or the path of a .jinja file, got {chat_template!r}")
    if chat_template not in {m.value for m in ChatTemplateMode} and not Path(chat_template).is_file():
        raise ValueError(
            f"chat_template {chat_template!r} is neither 'mftcoder' nor 'model', and no such template file exists "
            "(expected the path of a .jinja file)"
        )
    if chat_template != ChatTemplateMode.MFTCODER.value and role_markers is not None:
        raise ValueError(
            f"role_markers apply to chat_template 'mftcoder' only; with chat_template {chat_template!r} the "
            "template writes the turns. Remove role_markers, or use chat_template 'mftcoder'"
        )
    return chat_template


def template_source(tokenizer: Any, chat_template: str) -> tuple[str, str]:
    """The Jinja source of a template mode and a name for it: (template, name).

    Raises:
        ValueError: `model` with a tokenizer that has no chat template.
    """
    if chat_template == ChatTemplateMode.MODEL.value:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat_template 'model' uses the tokenizer's own chat template, but this tokenizer has none; "
                "use chat_template 'mftcoder' (MFTCoder's format) or the path of a .jinja template file"
            )
        return tokenizer.get_chat_template(), "the tokenizer's chat template"
    path = Path(chat_template)
    return path.read_text(encoding="utf-8"), f"the chat template {str(path)!r}"


def get_prompt_format(
    tokenizer: Any,
    chat_template: str = ChatTemplateMode.MFTCODER.value,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> PromptFormat:
    """The prompt format of `chat_template` for this tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        chat_template: "mftcoder" (default), "model" (the tokenizer's own template) or a .jinja path.
        role_markers: MFTCoder's turn markers (mftcoder only).
        eos_token: the token that ends MFTCoder answers and text records (default the tokenizer's EOS).

    Raises:
        ValueError: a bad setting; `ChatTemplateError` for a template that cannot be trained with.
    """
    check_chat_template_setting(chat_template, role_markers)
    if chat_template == ChatTemplateMode.MFTCODER.value:
        return MFTCoderFormat(RoleMarkers.from_config(role_markers), resolve_eos_token_id(tokenizer, eos_token))
    template, name = template_source(tokenizer, chat_template)
    return TemplateFormat(tokenizer, template, name, eos_token)


def render_conversation(
    record: Mapping[str, Any],
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    chat_template: str = ChatTemplateMode.MFTCODER.value,
) -> dict[str, list[int]]:
    """Render one jsonl record into `{"input_ids": [...], "labels": [...]}`, labels -100 where no loss.

    Args:
        record: a decoded record in any record format (chat_rounds, messages, ShareGPT, prompt/completion,
            alpaca, single-turn, text; `mft_trainer.formats`).
        tokenizer: a Hugging Face tokenizer.
        role_markers: the turn markers of `mftcoder` (default MFTCoder's `<s>system\\n`, `<s>human\\n`, `<s>bot\\n`).
        eos_token: the token that ends an assistant turn in `mftcoder` (default: the tokenizer's EOS).
        chat_template: the prompt format (module docstring).

    Raises:
        InvalidRecord: the record breaks the data contract (the message says how).
        ChatTemplateError: the template cannot render the record with a right mask.

    >>> render_conversation({"chat_rounds": [{"role": "human", "content": "hi"},
    ...                                      {"role": "bot", "content": "yo"}]}, tok)  # doctest: +SKIP
    {'input_ids': [27, 82, 29, 10734, 198, 5303, 198, 27, 82, 29, 13645, 198, 8226, 198, 50256, 198],
     'labels': [-100, ..., -100, 8226, 198, 50256, -100]}
    """
    fmt = get_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    return tokenize_segments([fmt.training_segments(parse_record(record))], tokenizer, fmt.eos_token_id)[0]


def build_inference_prompt(
    messages: Sequence[Mapping[str, str]] | Mapping[str, Any],
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> InferencePrompt:
    """Build the prompt for the next assistant turn of a conversation that ends with a user turn.

    The ids equal the training ids of the same conversation up to where the answer starts.

    >>> build_inference_prompt([{"role": "human", "content": "hi"}], tok).text   # doctest: +SKIP
    '<s>human\\nhi\\n<s>bot\\n'

    Args:
        messages: the turns (`[{"role", "content"}, ...]`, roles as in `chat_rounds`), or a record in
            any record format without its answer, read by `mft_trainer.formats.prompt_messages` (a
            `chat_rounds`, `messages` or `conversations` list ending with a user turn, a single-turn
            prompt such as `{"instruction": ..., "input": ...}`, ...), as batch inference reads it.
        chat_template: the prompt format (module docstring), or a `PromptFormat` already built
            (then role_markers and eos_token are not used).
    """
    if isinstance(messages, Mapping):
        parsed = prompt_messages(messages)
    else:
        parsed = parse_messages(list(messages) if messages is not None else None, last_role="user")
    fmt = chat_template if isinstance(chat_template, PromptFormat) else get_prompt_format(
        tokenizer, chat_template, role_markers, eos_token
    )
    return fmt.inference_prompt(parsed, tokenizer)


__all__ = [
    "ChatTemplateError",
    "ChatTemplateMode",
    "build_inference_prompt",
    "check_chat_template_setting",
    "get_prompt_format",
    "render_conversation",
    "template_source",
]
