"""The prompt format of DESIGN.md, token by token, with the real GPT-2 tokenizer.

Expected ids are built here from the DESIGN.md strings, piece by piece, independently of the
renderer's own segment logic.
"""

import pytest

from mft_trainer import InvalidRecord, RoleMarkers, build_inference_prompt, render_conversation

from .helpers import chat

EOS = 50256  # GPT-2's <|endoftext|>
IGNORE = -100


def expect(tokenizer, *pieces):
    """Expected (input_ids, labels) from (text, trained) pieces; the string "EOS" is the EOS id."""
    ids, labels = [], []
    for text, trained in pieces:
        piece_ids = [EOS] if text == "EOS" else tokenizer.encode(text, add_special_tokens=False)
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE] * len(piece_ids)
    labels[0] = IGNORE
    return ids, labels


def assert_rendered(rendered, ids, labels):
    assert rendered["input_ids"] == ids
    assert rendered["labels"] == labels


def test_single_round_chat_trains_answer_newline_and_eos_only(tokenizer):
    rendered = render_conversation(chat(("human", "What is 2+2?"), ("bot", "4")), tokenizer)
    ids, labels = expect(tokenizer, ("<s>human\nWhat is 2+2?\n<s>bot\n", False), ("4\n", True), ("EOS", True), ("\n", False))
    assert_rendered(rendered, ids, labels)
    # The trained tokens are exactly the answer, its newline and EOS.
    trained = [t for t, label in zip(rendered["input_ids"], rendered["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "4\n<|endoftext|>"


def test_system_and_multi_round(tokenizer):
    record = chat(
        ("system", "You are terse."),
        ("human", "q1"),
        ("bot", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    )
    ids, labels = expect(
        tokenizer,
        ("<s>system\nYou are terse.\n", False),
        ("<s>human\nq1\n<s>bot\n", False),
        ("a1\n", True),
        ("EOS", True),
        ("\n", False),
        ("<s>human\nq2\n<s>bot\n", False),
        ("a2\n", True),
        ("EOS", True),
        ("\n", False),
    )
    assert_rendered(render_conversation(record, tokenizer), ids, labels)
    text = tokenizer.decode(ids)
    assert text == "<s>system\nYou are terse.\n<s>human\nq1\n<s>bot\na1\n<|endoftext|>\n<s>human\nq2\n<s>bot\na2\n<|endoftext|>\n"


def test_gpt_role_spelling_and_case(tokenizer):
    a = render_conversation(chat(("Human", "hi"), ("gpt", "yo")), tokenizer)
    b = render_conversation(chat(("human", "hi"), ("bot", "yo")), tokenizer)
    assert a == b


def test_custom_role_markers(tokenizer):
    markers = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    record = chat(("system", "S"), ("human", "Q"), ("bot", "A"))
    ids, labels = expect(
        tokenizer,
        ("<|system|>\nS\n", False),
        ("<|user|>\nQ\n<|assistant|>\n", False),
        ("A\n", True),
        ("EOS", True),
        ("\n", False),
    )
    assert_rendered(render_conversation(record, tokenizer, role_markers=markers), ids, labels)
    # human/bot are accepted as spellings of the user/assistant keys
    alias = {"system": "<|system|>\n", "human": "<|user|>\n", "bot": "<|assistant|>\n"}
    assert render_conversation(record, tokenizer, role_markers=alias)["input_ids"] == ids


def test_unknown_role_marker_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key"):
        RoleMarkers.from_config({"narrator": "x"})


@pytest.mark.parametrize(
    "prompt_key,answer_key",
    [
        ("prompt", "answer"),
        ("prompt", "response"),
        ("instruction", "output"),
        ("instruction", "response"),
        ("question", "response"),
        ("question", "answer"),
        ("query", "answer"),
        ("input", "output"),
    ],
)
def test_single_turn_formats_are_two_segments_without_trailing_newline(tokenizer, prompt_key, answer_key):
    record = {prompt_key: "Write hi", answer_key: "print('hi')", "id": 7}
    ids, labels = expect(tokenizer, ("<s>human\nWrite hi\n<s>bot\n", False), ("print('hi')\n", True), ("EOS", True))
    assert_rendered(render_conversation(record, tokenizer), ids, labels)


def test_single_turn_with_system_is_one_prompt_segment(tokenizer):
    record = {"system": "Be brief.", "prompt": "Q", "answer": "A"}
    ids, labels = expect(tokenizer, ("<s>system\nBe brief.\n<s>human\nQ\n<s>bot\n", False), ("A\n", True), ("EOS", True))
    assert_rendered(render_conversation(record, tokenizer), ids, labels)


def test_single_turn_empty_system_means_no_system(tokenizer):
    with_empty = render_conversation({"system": "", "prompt": "Q", "answer": "A"}, tokenizer)
    without = render_conversation({"prompt": "Q", "answer": "A"}, tokenizer)
    assert with_empty == without


def test_alpaca_record_keeps_instruction_and_input(tokenizer):
    record = {"instruction": "Sum the list.", "input": "[1, 2]", "output": "3"}
    ids, labels = expect(tokenizer, ("<s>human\nSum the list.\n\n[1, 2]\n<s>bot\n", False), ("3\n", True), ("EOS", True))
    assert_rendered(render_conversation(record, tokenizer), ids, labels)
    no_input = render_conversation({"instruction": "Say 3.", "input": "", "output": "3"}, tokenizer)
    assert no_input == render_conversation({"instruction": "Say 3.", "output": "3"}, tokenizer)


def test_text_record_trains_every_predictable_token(tokenizer):
    rendered = render_conversation({"text": "def f():\n    return 1"}, tokenizer)
    ids = tokenizer.encode("def f():\n    return 1\n", add_special_tokens=False) + [EOS]
    assert rendered["input_ids"] == ids
    # Every token is trained except the first, which no position predicts.
    assert rendered["labels"] == [IGNORE] + ids[1:]


def test_non_breaking_spaces_become_plain_spaces(tokenizer):
    nbsp = render_conversation(chat(("human", "a\u00a0b"), ("bot", "c\u202fd")), tokenizer)
    plain = render_conversation(chat(("human", "a b"), ("bot", "c d")), tokenizer)
    assert nbsp == plain


def test_eos_token_override(tokenizer):
    # Any single vocabulary token can end a turn; here "\n\n" (GPT-2 id 628).
    rendered = render_conversation(chat(("human", "q"), ("bot", "a")), tokenizer, eos_token="ĊĊ")
    assert rendered["input_ids"][-2] == 628
    assert EOS not in rendered["input_ids"]
    with pytest.raises(ValueError, match="not a single token"):
        render_conversation(chat(("human", "q"), ("bot", "a")), tokenizer, eos_token="<|not a token|>")


def test_invalid_record_raises_with_reason(tokenizer):
    with pytest.raises(InvalidRecord, match="ends with a user turn"):
        render_conversation(chat(("human", "q")), tokenizer)


def test_inference_prompt_is_the_training_prefix(tokenizer):
    history = [("system", "S"), ("human", "q1"), ("bot", "a1"), ("human", "q2")]
    prompt = build_inference_prompt([{"role": r, "content": c} for r, c in history], tokenizer)
    assert prompt.text == "<s>system\nS\n<s>human\nq1\n<s>bot\na1\n<|endoftext|>\n<s>human\nq2\n<s>bot\n"
    trained = render_conversation(chat(*history, ("bot", "a2")), tokenizer)
    n = len(prompt.input_ids)
    assert trained["input_ids"][:n] == prompt.input_ids
    # The prompt stops exactly where the trained answer starts.
    assert trained["labels"][n - 1] == IGNORE and trained["labels"][n] != IGNORE
    # Same result from a record with chat_rounds.
    assert build_inference_prompt(chat(*history), tokenizer) == prompt


def test_inference_prompt_must_end_with_user_turn(tokenizer):
    with pytest.raises(InvalidRecord, match="must be the user's question"):
        build_inference_prompt([{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}], tokenizer)


def test_example_data_renders_per_design(tokenizer, example_task_dirs):
    """Every bundled example conversation renders to exactly the DESIGN.md pieces."""
    import json
    from pathlib import Path

    checked = 0
    for task_dir in example_task_dirs:
        for line in (Path(task_dir) / "train.jsonl").read_text().splitlines():
            turns = json.loads(line)["chat_rounds"]
            pieces = []
            for turn in turns:
                content = turn["content"].replace("\u00a0", " ").replace("\u202f", " ")
                if turn["role"] == "system":
                    pieces.append((f"<s>system\n{content}\n", False))
                elif turn["role"] == "human":
                    pieces.append((f"<s>human\n{content}\n<s>bot\n", False))
                else:
                    pieces += [(f"{content}\n", True), ("EOS", True), ("\n", False)]
            ids, labels = expect(tokenizer, *pieces)
            assert_rendered(render_conversation(json.loads(line), tokenizer), ids, labels)
            checked += 1
    assert checked == 100
