"""Training in a model's own chat template (`chat_template: model` or a .jinja file).

For each template family (fixtures in tests/fixtures/chat_templates, rendered with the GPT-2 tokenizer
plus their control tokens, and the real SmolLM2-135M-Instruct tokenizer with its own template):
- the training text is what `apply_chat_template` writes, and the token ids equal its
  `tokenize=True` ids wherever segment-wise tokenization does not differ from whole-text tokenization
  (the differences are counted and must be merges across a segment boundary);
- the trained tokens, decoded turn by turn, are exactly each assistant content plus the template's
  end-of-turn marker;
- the prompt sent for generation before each assistant turn is the training prefix of that turn.
Templates that break the prefix property, write the date or never end a turn are refused.
"""

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mft_trainer import ChatTemplateError, DataConfig, build_inference_prompt, build_mft_dataset, get_prompt_format
from mft_trainer.constants import IGNORE_INDEX
from mft_trainer.formats import parse_record
from mft_trainer.segments import tokenize_segments

from .conftest import EXAMPLE_DATA, REPO
from .helpers import chat, write_jsonl

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SMOLLM2_TOKENIZER = REPO / "examples" / "tokenizers" / "smollm2-135m-instruct"
CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# family -> (template file or None for the tokenizer's own, end-of-turn marker, whether contents are trimmed)
FAMILIES = {
    "chatml_default_system": ("chatml_default_system.jinja", "<|im_end|>", False),
    "llama3_headers": ("llama3_headers.jinja", "<|eot_id|>", True),
    "mistral_inst": ("mistral_inst.jinja", "<|endoftext|>", False),
    "generation_tag": ("generation_tag.jinja", "<|end|>", False),
    "smollm2": (None, "<|im_end|>", False),
}

CONVERSATIONS = {
    "one_round": chat(("human", "What is 2+2?"), ("bot", "4")),
    "system_multi_round": chat(
        ("system", "You are a helpful coding assistant."),
        ("human", "Write a function that adds two numbers."),
        ("bot", "```python\ndef add(a, b):\n    return a + b\n```"),
        ("human", "Now in C."),
        ("bot", "int add(int a, int b) { return a + b; }"),
        ("human", "Thanks!"),
        ("bot", "You're welcome."),
    ),
    "multi_round_without_system": chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")),
    "single_turn": {"prompt": "Reverse a string in Python.", "answer": "s[::-1]"},
    "single_turn_with_system": {"system": "Be brief.", "question": "2*3?", "answer": "6"},
    "alpaca": {"instruction": "Sort the list.", "input": "[3, 1, 2]", "output": "[1, 2, 3]"},
    "unicode_and_template_syntax": chat(("human", "Render {{ x }} {% if y %}z{% endif %} 你好"),
                                        ("bot", "Überprüft 🤖\n\ttabs")),
}


@pytest.fixture(scope="module")
def fixture_tokenizer(tokenizer):
    """GPT-2 plus the control tokens of the fixture templates (ChatML, Llama-3 headers, Phi-3 markers)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": CONTROL_TOKENS})
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, fixture_tokenizer, smollm2_tokenizer):
    """(name, tokenizer with the template as its own, end-of-turn marker, trims contents)."""
    file, end_of_turn, trims = FAMILIES[request.param]
    if file is None:
        return request.param, smollm2_tokenizer, end_of_turn, trims
    tok = copy.deepcopy(fixture_tokenizer)
    tok.chat_template = (TEMPLATES / file).read_text()
    return request.param, tok, end_of_turn, trims


def example_records():
    records = []
    for path in sorted(EXAMPLE_DATA.rglob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def messages_of(record):
    return [{"role": m.role, "content": m.content} for m in parse_record(record).messages]


def rendered(record, tok):
    fmt = get_prompt_format(tok, "model")
    segments = fmt.training_segments(parse_record(record))
    return segments, tokenize_segments([segments], tok, fmt.eos_token_id)[0]


def trained_spans(sample):
    """The runs of trained token ids (position 0 never is)."""
    spans, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_text_is_the_templates_and_trained_spans_are_answers_plus_end_of_turn(family, name):
    _, tok, end_of_turn, trims = family
    record = CONVERSATIONS[name]
    messages = messages_of(record)
    segments, sample = rendered(record, tok)
    assert "".join(s.text for s in segments) == tok.apply_chat_template(messages, tokenize=False)
    answers = [m["content"].strip() if trims else m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(span) for span in trained_spans(sample)] == [a + end_of_turn for a in answers]


def first_difference_touches_a_boundary(segments, ours, whole, tok):
    """True when the first token where two tokenizations of the same text part lies at a segment
    boundary: a merge (or split) across it, not a different text."""
    p = next(i for i, (a, b) in enumerate(zip(ours + [None], whole + [None])) if a != b)
    start = len(tok.decode(ours[:p]))
    reach = max(len(tok.decode(ours[p:p + 1])), len(tok.decode(whole[p:p + 1])))
    boundaries, offset = set(), 0
    for segment in segments:
        offset += len(segment.text)
        boundaries.add(offset)
    return any(start < b <= start + reach for b in boundaries)


def test_every_example_conversation_matches_apply_chat_template(family):
    """All 100 example records: the ids equal apply_chat_template(tokenize=True) except where
    segment-wise tokenization parts from whole-text tokenization at a segment boundary (counted);
    there the text is the same, and the segment-wise ids are the ones inference sends."""
    name, tok, end_of_turn, trims = family
    differing = 0
    records = example_records()
    for record in records:
        messages = messages_of(record)
        segments, sample = rendered(record, tok)
        whole = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        if sample["input_ids"] != whole:
            differing += 1
            assert tok.decode(sample["input_ids"]) == tok.decode(whole)
            assert first_difference_touches_a_boundary(segments, sample["input_ids"], whole, tok)
        answers = [m["content"].strip() if trims else m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(span) for span in trained_spans(sample)] == [a + end_of_turn for a in answers]
    print(f"{name}: segment-wise ids differ from whole-text ids in {differing} of {len(records)} example records")
    # Where they differ (docs/data_format.md): with GPT-2's pre-tokenizer the Llama-3 header's "\n\n" is one
    # token at the end of a prompt but two before a letter; Mistral's plain-text [/INST] merges with some
    # answers' first characters; SmolLM2's "assistant\n" merges with the indentation that code_completion
    # answers start with. ChatML with contents that start with a letter never differs.
    if name in ("chatml_default_system", "generation_tag"):
        assert differing == 0


def test_inference_prompt_is_the_training_prefix_of_every_turn(family):
    _, tok, _, _ = family
    for record in [CONVERSATIONS["system_multi_round"], *example_records()[::7]]:
        messages = messages_of(record)
        _, sample = rendered(record, tok)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = build_inference_prompt(messages[:index], tok, chat_template="model")
            assert prompt.text == tok.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            assert sample["input_ids"][: len(prompt.input_ids)] == prompt.input_ids
            # The answer starts right after the prompt: its first token is trained.
            assert sample["labels"][len(prompt.input_ids)] != IGNORE_INDEX


def test_generation_markers_agree_with_the_prefix_mask(fixture_tokenizer):
    """For a template with {% generation %}, HF's assistant mask marks exactly the trained tokens."""
    tok = copy.deepcopy(fixture_tokenizer)
    tok.chat_template = (TEMPLATES / "generation_tag.jinja").read_text()
    for record in [*CONVERSATIONS.values(), *example_records()]:
        _, sample = rendered(record, tok)
        marked = tok.apply_chat_template(messages_of(record), tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert marked["input_ids"] == sample["input_ids"]
        assert marked["assistant_masks"] == [int(label != IGNORE_INDEX) for label in sample["labels"]]


def test_end_of_turn_token_and_answer_suffix(fixture_tokenizer, smollm2_tokenizer):
    fmt = get_prompt_format(smollm2_tokenizer, "model")
    assert (fmt.end_of_turn, fmt.end_of_turn_token_id, fmt.answer_suffix) == ("<|im_end|>", 2, "")
    llama = get_prompt_format(fixture_tokenizer, str(TEMPLATES / "llama3_headers.jinja"))
    assert llama.end_of_turn_token_id == fixture_tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_text_records_stay_plain_language_model_text(smollm2_tokenizer):
    _, sample = rendered({"text": "def f():\n    pass"}, smollm2_tokenizer)
    assert smollm2_tokenizer.decode(sample["input_ids"]) == "def f():\n    pass\n<|im_end|>"
    assert sample["labels"][1:] == sample["input_ids"][1:]


def test_template_that_rewrites_earlier_turns_is_refused_naming_template_and_record(tmp_path, fixture_tokenizer):
    template = TEMPLATES / "drops_past_reasoning.jinja"
    ok = chat(("user", "q"), ("assistant", "<think>hmm</think>\nA"))
    rewritten = chat(("user", "q"), ("assistant", "<think>hmm</think>\nA"), ("user", "q2"), ("assistant", "B"))
    path = write_jsonl(tmp_path / "reasoning" / "data.jsonl", [ok, ok, rewritten])
    config = DataConfig(data_paths=[str(path.parent)], data_split="100,0", chat_template=str(template),
                        dataset_cache_dir="none")
    with pytest.raises(ChatTemplateError) as error:
        build_mft_dataset(config, fixture_tokenizer)
    message = str(error.value)
    assert f"{path}:3:" in message and str(template) in message and "prefix property at assistant turn 1" in message
    # A single round is fine: nothing is rewritten.
    path.write_text(json.dumps(ok) + "\n")
    assert len(build_mft_dataset(config, fixture_tokenizer).train) == 1


@pytest.mark.parametrize(
    "file, message",
    [("current_date.jinja", "writes the current date"), ("no_end_of_turn.jinja", "writes nothing after")],
)
def test_templates_that_cannot_be_masked_are_refused(fixture_tokenizer, file, message):
    with pytest.raises(ChatTemplateError, match=message):
        get_prompt_format(fixture_tokenizer, str(TEMPLATES / file))


def test_template_errors_name_the_record(tmp_path, fixture_tokenizer):
    """A template that raises on a record (as Mistral's does on roles it does not take) names file and line."""
    path = write_jsonl(tmp_path / "t" / "data.jsonl", [CONVERSATIONS["one_round"], chat(("user", "boom"), ("bot", "x"))])
    tok = copy.deepcopy(fixture_tokenizer)
    tok.chat_template = "{{ raise_exception('no ' + messages[0]['content']) if messages[0]['content'] == 'boom' }}" + \
        (TEMPLATES / "chatml_default_system.jinja").read_text()
    config = DataConfig(data_paths=[str(path.parent)], data_split="100,0", chat_template="model",
                        dataset_cache_dir="none")
    with pytest.raises(ChatTemplateError, match=rf"{path}:2: the tokenizer's chat template raised an error: no boom"):
        build_mft_dataset(config, tok)


def test_settings_are_checked_before_anything_is_read(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no such template file"):
        DataConfig(data_paths=["x"], chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="role_markers apply to chat_template 'mftcoder' only"):
        DataConfig(data_paths=["x"], chat_template="model", role_markers={"user": "U:"})
    with pytest.raises(ValueError, match="this tokenizer has none"):
        get_prompt_format(tokenizer, "model")  # GPT-2 has no chat template


def test_dataset_in_model_mode_trains_only_answers_and_end_of_turn(smollm2_tokenizer, example_task_dirs):
    data = build_mft_dataset(
        DataConfig(data_paths=example_task_dirs, data_split="100,0", chat_template="model", dataset_cache_dir="none"),
        smollm2_tokenizer,
    )
    sample = data.train[0]
    text = smollm2_tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>system\n")
    trained = "".join(smollm2_tokenizer.decode(span) for span in trained_spans(sample))
    assert "<|im_start|>" not in trained and trained.endswith("<|im_end|>")
    assert data.prompt_format.end_of_turn_token_id == 2
