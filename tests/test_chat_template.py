"""The chat template reproduces the training prompt format byte for byte (DESIGN.md, invariant 5).

The renderer is the reference: for every conversation, `apply_chat_template` must give the text (and,
with the GPT-2 tokenizer, the ids) that training and `build_inference_prompt` give.
"""

import copy
import warnings
import json

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from mft_trainer import build_inference_prompt, render_conversation
from mft_trainer.chat_template import build_chat_template, install_chat_template
from mft_trainer.formats import parse_record
from mft_trainer.rendering import RoleMarkers, record_segments

EOS = "<|endoftext|>"

CONVERSATIONS = {
    "one_round": [("human", "What is 2+2?"), ("bot", "4")],
    "system_multi_round": [
        ("system", "You are a helpful coding assistant."),
        ("human", "Write a function that adds two numbers."),
        ("bot", "```python\ndef add(a, b):\n    return a + b\n```"),
        ("human", "Now in C."),
        ("bot", "int add(int a, int b) { return a + b; }"),
        ("human", "Thanks!"),
        ("bot", "You're welcome."),
    ],
    "role_spellings": [
        ("System", "S"),
        ("USER", "q1"),
        ("gpt", "a1"),
        (" Human ", "q2"),
        ("Assistant", "a2"),
        ("user", "q3"),
        ("BOT", "a3"),
    ],
    "non_breaking_spaces": [("system", "x\u00a0y"), ("human", "100\u202f%\u00a0sure?"), ("bot", "oui\u00a0!")],
    # Contents are data, never template code, whatever they contain.
    "template_syntax_and_unicode": [
        ("human", "Render {{ name }} with {% if x %}jinja{% endif %} and 'quotes' \\n"),
        ("bot", "Überprüft: 你好 🤖\n\ttabs and trailing newline\n"),
    ],
    "markers_in_content": [("human", "<s>bot\nfake marker"), ("bot", "<s>human\nalso data")],
}


def turns(pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def training_text(pairs, markers=None, eos_text=EOS):
    """The training text: the renderer's segments joined, EOS after each answer."""
    segments = record_segments(parse_record({"chat_rounds": turns(pairs)}), RoleMarkers.from_config(markers))
    return "".join(s.text + (eos_text if s.ends_with_eos else "") for s in segments)


def user_prefixes(pairs):
    """Every prefix of a conversation that ends with a user turn (what a chat prompt looks like)."""
    return [pairs[: i + 1] for i, (role, _) in enumerate(pairs) if role.strip().lower() in ("human", "user")]


@pytest.fixture(scope="module")
def templated(tokenizer):
    """A copy of the GPT-2 tokenizer with the default template (the session one stays untouched)."""
    tok = copy.deepcopy(tokenizer)
    install_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def marked(tokenizer):
    """The template with `{% generation %}` markers, for assistant masks."""
    tok = copy.deepcopy(tokenizer)
    install_chat_template(tok, generation_markers=True)
    return tok


def test_the_design_example_renders_exactly(templated):
    conversation = turns([("system", "S"), ("human", "q1"), ("bot", "a1"), ("human", "q2"), ("bot", "a2")])
    text = templated.apply_chat_template(conversation, tokenize=False)
    assert text == f"<s>system\nS\n<s>human\nq1\n<s>bot\na1\n{EOS}\n<s>human\nq2\n<s>bot\na2\n{EOS}\n"
    prompt = templated.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s>system\nS\n<s>human\nq1\n<s>bot\na1\n{EOS}\n<s>human\nq2\n<s>bot\n"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_full_conversation_equals_training_text_and_ids(templated, marked, name):
    pairs = CONVERSATIONS[name]
    rendered = render_conversation({"chat_rounds": turns(pairs)}, templated)
    text = templated.apply_chat_template(turns(pairs), tokenize=False, add_generation_prompt=False)
    assert text == training_text(pairs)
    assert text == templated.decode(rendered["input_ids"])
    ids = templated.apply_chat_template(turns(pairs), tokenize=True, return_dict=False)
    assert ids == rendered["input_ids"]
    assert marked.apply_chat_template(turns(pairs), tokenize=False) == text
    assert assistant_mask(marked, pairs) == trained(rendered)


def assistant_mask(tokenizer, pairs):
    """The template's `{% generation %}` mask, as TRL's assistant_only_loss uses it."""
    return tokenizer.apply_chat_template(turns(pairs), return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]


def trained(rendered):
    return [int(label != -100) for label in rendered["labels"]]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_generation_prompt_equals_inference_prompt(templated, name):
    for prefix in user_prefixes(CONVERSATIONS[name]):
        expected = build_inference_prompt(turns(prefix), templated)
        text = templated.apply_chat_template(turns(prefix), tokenize=False, add_generation_prompt=True)
        assert text == expected.text
        ids = templated.apply_chat_template(turns(prefix), add_generation_prompt=True, return_dict=False)
        assert ids == expected.input_ids


def test_every_example_conversation_matches(templated, marked, example_task_dirs):
    from pathlib import Path

    checked = 0
    for task_dir in example_task_dirs:
        for line in (Path(task_dir) / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            pairs = [(t["role"], t["content"]) for t in record["chat_rounds"]]
            ids = templated.apply_chat_template(turns(pairs), return_dict=False)
            rendered = render_conversation(record, templated)
            assert ids == rendered["input_ids"], record["id"]
            assert assistant_mask(marked, pairs) == trained(rendered), record["id"]
            for prefix in user_prefixes(pairs):
                prompt_ids = templated.apply_chat_template(turns(prefix), add_generation_prompt=True, return_dict=False)
                assert prompt_ids == build_inference_prompt(turns(prefix), templated).input_ids, record["id"]
            checked += 1
    assert checked == 100


@pytest.mark.parametrize(
    "markers",
    [
        {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
        # quotes, backslashes, braces, tabs, non-ASCII and invisible characters survive the Jinja literal
        {"system": "### Système 'sys' \\ {{x}}\n", "human": "\t[INST] \"q\" {% raw %}\n", "bot": "[/INST]\u00a0🤖:\n"},
    ],
)
def test_custom_role_markers(templated, markers):
    template = build_chat_template(markers, EOS)
    pairs = CONVERSATIONS["system_multi_round"]
    text = templated.apply_chat_template(turns(pairs), chat_template=template, tokenize=False)
    assert text == training_text(pairs, markers)
    for prefix in user_prefixes(pairs):
        expected = build_inference_prompt(turns(prefix), templated, role_markers=markers).text
        prompt = templated.apply_chat_template(
            turns(prefix), chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert prompt == expected


def test_eos_token_override_with_an_added_special_token(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    install_chat_template(tok, eos_token="<|end|>")
    pairs = CONVERSATIONS["system_multi_round"]
    rendered = render_conversation({"chat_rounds": turns(pairs)}, tok, eos_token="<|end|>")
    assert tok.apply_chat_template(turns(pairs), tokenize=False) == training_text(pairs, eos_text="<|end|>")
    assert tok.apply_chat_template(turns(pairs), return_dict=False) == rendered["input_ids"]
    assert EOS not in tok.apply_chat_template(turns(pairs), tokenize=False)


def test_ordinary_eos_token_is_written_as_its_decoded_text(tokenizer):
    tok = copy.deepcopy(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "\n\n" tokenizes back to its single id: nothing to warn about
        install_chat_template(tok, eos_token="ĊĊ")  # GPT-2's "\n\n", an ordinary vocabulary token
    text = tok.apply_chat_template(turns([("human", "q"), ("bot", "a")]), tokenize=False)
    assert text == "<s>human\nq\n<s>bot\na\n\n\n\n"
    assert text == build_inference_prompt(turns([("human", "q"), ("bot", "a"), ("human", "x")]), tok, eos_token="ĊĊ").text[: len(text)]


def test_template_without_eos_uses_the_tokenizers_eos_token(templated):
    generic = build_chat_template()
    pairs = CONVERSATIONS["one_round"]
    text = templated.apply_chat_template(turns(pairs), chat_template=generic, tokenize=False)
    assert text == training_text(pairs)


def test_user_turn_without_generation_prompt_stops_after_the_question(templated):
    # As with every Hugging Face template, the assistant marker is the generation prompt.
    text = templated.apply_chat_template(turns([("human", "q")]), tokenize=False, add_generation_prompt=False)
    assert text == "<s>human\nq\n"


def test_continue_final_message_prefills_the_answer(templated):
    conversation = turns([("human", "Write hi"), ("bot", "print(")])
    text = templated.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    assert text == build_inference_prompt(conversation[:1], templated).text + "print("


@pytest.mark.parametrize(
    "pairs,add_generation_prompt,message",
    [
        ([("narrator", "x")], False, r"messages\[0\] has unknown role narrator"),
        ([("human", "q"), ("system", "S")], False, r"messages\[1\] is a system turn"),
        ([("human", "q1"), ("human", "q2")], False, r"messages\[1\] has role human, expected an assistant turn"),
        ([("bot", "a")], False, r"messages\[0\] has role bot, expected a user"),
        ([("human", "  ")], False, r"messages\[0\] \(human\) has no content"),
        ([("human", "q"), ("bot", "a")], True, "ends with a user turn"),
    ],
)
def test_conversations_the_renderer_rejects_raise(templated, pairs, add_generation_prompt, message):
    with pytest.raises(TemplateError, match=message):
        templated.apply_chat_template(turns(pairs), tokenize=False, add_generation_prompt=add_generation_prompt)


def test_default_template_has_no_generation_tag(templated, marked):
    """Servers that render with minijinja (TGI) or plain Jinja (llama-cpp-python) reject the tag, so
    the template saved with a model must not have it."""
    assert "generation" not in templated.chat_template.replace("add_generation_prompt", "")
    assert "{%- generation -%}" in marked.chat_template


def test_saved_and_reloaded_tokenizer_keeps_the_template(tokenizer, tmp_path):
    markers = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    tok = copy.deepcopy(tokenizer)
    template = install_chat_template(tok, role_markers=markers)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.chat_template == template
    pairs = CONVERSATIONS["system_multi_round"]
    prompt = pairs[:-1]
    assert reloaded.apply_chat_template(turns(prompt), tokenize=False, add_generation_prompt=True) == (
        build_inference_prompt(turns(prompt), tok, role_markers=markers).text
    )
    assert reloaded.apply_chat_template(turns(pairs), return_dict=False) == (
        render_conversation({"chat_rounds": turns(pairs)}, tok, role_markers=markers)["input_ids"]
    )
