"""A Jinja chat template that reproduces the training prompt format byte for byte (invariant 5).

The renderer (`mft_trainer.rendering`) is the reference for the prompt format. This module writes the
same format as a Jinja chat template and installs it on a tokenizer, so that
`tokenizer.apply_chat_template` (and any server that uses it, such as vLLM or TGI) prompts a
fine-tuned model exactly as it was trained:

    <s>system\\n{system}\\n<s>human\\n{q1}\\n<s>bot\\n{a1}\\n{EOS}\\n<s>human\\n{q2}\\n<s>bot\\n

- With `add_generation_prompt=True`, a conversation ending with a user turn renders to
  `build_inference_prompt(conversation, tokenizer).text`.
- A conversation ending with an assistant turn renders to the training text: the concatenation of
  the renderer's segments, with the EOS token after each answer, then `\\n`.
- A conversation ending with a user turn and `add_generation_prompt=False` stops after the user's
  content (the assistant marker is the generation prompt), as with every Hugging Face template.
- With `generation_markers=True`, each answer and its EOS token are inside `{% generation %}` markers,
  so that `apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)` marks
  exactly the tokens that training puts a loss on (TRL's `assistant_only_loss=True` reads that mask).
  They are off by default, and saved tokenizers do not have them: `generation` is a tag of Hugging
  Face's Jinja set-up only, and servers that render templates with other engines (TGI's minijinja,
  llama-cpp-python) reject a template that has it.
- Roles are accepted in every spelling the data accepts (system, human/user, bot/assistant/gpt, any
  case); contents get the renderer's formatting (non-breaking spaces made plain, a trailing `\\n`).
  A conversation the renderer would reject (unknown role, system turn not first, roles not
  alternating) raises a `TemplateError` that says which message is wrong.

The text is exact for every tokenizer. The token ids of `apply_chat_template(..., tokenize=True)`,
which tokenizes the whole string at once, equal the renderer's (which tokenizes segment by segment,
as in training) for byte-level BPE tokenizers such as GPT-2's on ordinary text; but some tokenizers
(sentencepiece ones that add a prefix space to each piece, for example) or unusual contents (an answer
that starts with a blank line) can merge or split tokens across a segment boundary differently. The
renderer is the reference: `build_inference_prompt(...).input_ids` are exactly the training ids.

>>> from transformers import AutoTokenizer                                       # doctest: +SKIP
>>> tok = AutoTokenizer.from_pretrained("examples/tokenizers/gpt2")              # doctest: +SKIP
>>> template = install_chat_template(tok)                                        # doctest: +SKIP
>>> tok.apply_chat_template([{"role": "user", "content": "hi"}],
...                         tokenize=False, add_generation_prompt=True)          # doctest: +SKIP
'<s>human\\nhi\\n<s>bot\\n'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from .records import ROLE_ALIASES, ROLE_SPELLINGS
from .rendering import RoleMarkers
from .segments import resolve_eos_token_id

# Every template built here starts with this comment, so that ours can be told from a base model's.
TEMPLATE_HEADER = "{#- mft-trainer prompt format"

# The template is written with `{%- ... -%}` everywhere and emits text only through `{{ ... }}`, so
# that Jinja's whitespace handling (Hugging Face renders with trim_blocks and lstrip_blocks) can never
# add or drop a byte. The slots `{system}`, `{eos}`, ... are filled in by `build_chat_template`.
_TEMPLATE = TEMPLATE_HEADER + """ (see mft_trainer/chat_template.py); generated, do not edit by hand. -#}
{%- set roles = {aliases} -%}
{%- set ns = namespace(expected='user', last='') -%}
{%- for message in messages -%}
    {%- set where = 'messages[' ~ loop.index0 ~ '] ' -%}
    {%- set spelled = message['role'] | string | trim | lower -%}
    {%- if spelled not in roles -%}
        {{- raise_exception(where ~ 'has unknown role ' ~ message['role'] ~ '; expected one of {spellings}') -}}
    {%- endif -%}
    {%- set role = roles[spelled] -%}
    {%- if message['content'] is not string or (message['content'] | trim) == '' -%}
        {{- raise_exception(where ~ '(' ~ message['role'] ~ ') has no content; expected a non-empty string') -}}
    {%- endif -%}
    {%- set content = message['content'] | replace({nbsp}, ' ') | replace({nnbsp}, ' ') ~ '\\n' -%}
    {%- if role == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception(where ~ 'is a system turn; only the first turn may be a system turn') -}}
        {%- endif -%}
        {{- {system} ~ content -}}
    {%- else -%}
        {%- if role != ns.expected -%}
            {{- raise_exception(where ~ 'has role ' ~ message['role'] ~ ', expected '
                ~ ('an assistant' if ns.expected == 'assistant' else 'a user') ~ ' turn; roles must alternate '
                ~ 'user, assistant, user, ... after an optional first system turn') -}}
        {%- endif -%}
        {%- if role == 'user' -%}
            {{- {user} ~ content -}}
            {%- set ns.expected = 'assistant' -%}
        {%- else -%}
            {{- {assistant} -}}
            {generation}{{- content ~ {eos} -}}{endgeneration}
            {{- '\\n' -}}
            {%- set ns.expected = 'user' -%}
        {%- endif -%}
    {%- endif -%}
    {%- set ns.last = role -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if ns.last != 'user' -%}
        {{- raise_exception('add_generation_prompt needs a conversation that ends with a user turn') -}}
    {%- endif -%}
    {{- {assistant} -}}
{%- endif -%}
"""


def _jinja_string(value: str) -> str:
    """`value` as a Jinja string literal (Jinja decodes Python-style escapes in string literals)."""
    out = []
    for char in value:
        if char in "\\'":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif not char.isprintable():
            # Invisible characters (non-breaking spaces, control characters) stay readable as escapes.
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def build_chat_template(
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    generation_markers: bool = False,
) -> str:
    """The Jinja chat template of the prompt format with these role markers and EOS token.

    Args:
        role_markers: the turn markers used in training (default MFTCoder's `<s>system\\n`,
            `<s>human\\n`, `<s>bot\\n`), as a `RoleMarkers` or a mapping as in `DataConfig.role_markers`.
        eos_token: the text of the token that ends each assistant turn, written into the template
            as is. None uses the `eos_token` variable that `apply_chat_template` passes (the
            tokenizer's EOS token); `install_chat_template` always fills it in.
        generation_markers: put each trained span (answer and EOS) inside `{% generation %}` markers,
            for `return_assistant_tokens_mask` and TRL's `assistant_only_loss` (Hugging Face's Jinja
            only; other template engines reject the tag).

    Returns:
        The template, to assign to `tokenizer.chat_template`.

    >>> template = build_chat_template(eos_token="<|endoftext|>")
    >>> "'<s>human\\\\n'" in template
    True
    """
    markers = RoleMarkers.from_config(role_markers)
    # `format` cannot be used on a template full of Jinja braces, so the slots are replaced by name.
    slots = {
        "{aliases}": "{" + ", ".join(f"{_jinja_string(k)}: {_jinja_string(v)}" for k, v in ROLE_ALIASES.items()) + "}",
        "{spellings}": ROLE_SPELLINGS,
        "{nbsp}": _jinja_string("\u00a0"),
        "{nnbsp}": _jinja_string("\u202f"),
        "{system}": _jinja_string(markers.system),
        "{user}": _jinja_string(markers.user),
        "{assistant}": _jinja_string(markers.assistant),
        "{eos}": "eos_token" if eos_token is None else _jinja_string(eos_token),
        "{generation}": "{%- generation -%}" if generation_markers else "",
        "{endgeneration}": "{%- endgeneration -%}" if generation_markers else "",
    }
    template = _TEMPLATE
    for slot, value in slots.items():
        template = template.replace(slot, value)
    return template


def is_mft_chat_template(template: str | None) -> bool:
    """True when `template` was written by `build_chat_template` (not a base model's own template).

    >>> is_mft_chat_template(build_chat_template())
    True
    """
    return isinstance(template, str) and template.startswith(TEMPLATE_HEADER)


def install_chat_template(
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    generation_markers: bool = False,
) -> str:
    """Set `tokenizer.chat_template` to the prompt format used in training, and return it.

    Call it with the same `role_markers` and `eos_token` as the training data (`DataConfig`) before
    `tokenizer.save_pretrained(...)`: the template is saved with the tokenizer and reloaded by
    `AutoTokenizer.from_pretrained`.

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place).
        role_markers: the turn markers (default MFTCoder's).
        eos_token: the token that ends an assistant turn (default: the tokenizer's EOS token).
        generation_markers: mark the trained spans for `return_assistant_tokens_mask` (see
            `build_chat_template`); off for a tokenizer that servers will load.

    Raises:
        ValueError: the tokenizer has no EOS token, or `eos_token` is not a token of its vocabulary.

    >>> template = install_chat_template(tok)                                        # doctest: +SKIP
    >>> tok.save_pretrained("out/model")  # the template travels with the tokenizer   # doctest: +SKIP
    """
    eos_token_id = resolve_eos_token_id(tokenizer, eos_token)
    # The same EOS text as `build_inference_prompt` writes, so that the two agree byte for byte.
    eos_text = tokenizer.decode([eos_token_id])
    encoded = tokenizer(eos_text, add_special_tokens=False)["input_ids"]
    if encoded != [eos_token_id]:
        # The text is still the renderer's, but whole-string tokenization cannot give the EOS id back:
        # only the renderer's ids (build_inference_prompt) are exact for such a token.
        warnings.warn(
            f"the EOS token {eos_text!r} (id {eos_token_id}) tokenizes to {encoded} as text, so "
            "apply_chat_template(..., tokenize=True) will not give the training ids after an assistant "
            "turn; use a special token as eos_token, or build prompts with build_inference_prompt",
            stacklevel=2,
        )
    template = build_chat_template(role_markers, eos_text, generation_markers)
    tokenizer.chat_template = template
    return template
