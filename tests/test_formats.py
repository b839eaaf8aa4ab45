"""Record formats: each format's fixture (tests/fixtures/formats) trains the same tokens as the same
conversations written as chat_rounds (or as prompt/answer pairs), in MFTCoder's format and in a
model's own template; bad records
of every format are errors naming the file and line; empty answers are trained as MFTCoder trains them."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mft_trainer import DataConfig, DataValidationError, InputFormat, Problem, build_mft_dataset, parse_record
from mft_trainer.constants import IGNORE_INDEX
from mft_trainer.reading import read_records

from .conftest import REPO
from .helpers import chat, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
SMOLLM2_TOKENIZER = REPO / "examples" / "tokenizers" / "smollm2-135m-instruct"

SYSTEM = "You are a helpful assistant."
REVERSE = [("system", SYSTEM), ("user", "Reverse a string in Python."),
           ("assistant", "def reverse(s):\n    return s[::-1]")]
ADD = [("user", "What is 2+2?"), ("assistant", "4")]
TWO_ROUNDS = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Goodbye.")]

# format -> the conversation of each line of its fixture
EXPECTED = {
    "chat_rounds": [REVERSE, ADD, TWO_ROUNDS],
    "messages": [REVERSE, ADD, TWO_ROUNDS],  # line 2 writes its question as two text parts
    "sharegpt": [REVERSE, ADD, TWO_ROUNDS],  # line 1 has a top-level system
    "prompt_completion": [REVERSE, ADD, TWO_ROUNDS],  # line 2 as strings; line 3's "Hello!" is context
    "alpaca": [REVERSE, [("user", "What is\n\n2+2?"), ("assistant", "4")]],  # the input joins after a blank line
    "single_turn": [REVERSE, ADD],
}


# The lines that are single-turn pairs: MFTCoder renders those with the pair layout, not as chat_rounds
# (the system prompt and question in one piece, no newline after the answer).
PAIRS = {("alpaca", 1), ("alpaca", 2), ("single_turn", 1), ("single_turn", 2), ("prompt_completion", 2)}


def reference_record(name: str, line: int, turns: list[tuple[str, str]]) -> dict:
    """The same conversation as chat_rounds, or as a prompt/answer pair for the pair formats."""
    if (name, line) not in PAIRS:
        return chat(*turns)
    roles = dict(turns)
    return {"system": roles.get("system"), "prompt": roles["user"], "answer": roles["assistant"]}


def read_fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)


def build(paths, tokenizer, **kwargs):
    kwargs.setdefault("dataset_cache_dir", "none")
    return build_mft_dataset(DataConfig(data_paths=paths, data_split="100,0", **kwargs), tokenizer)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_is_detected_and_read_as_its_conversations(name):
    for record, expected in zip(read_fixture(name), EXPECTED[name], strict=True):
        parsed = parse_record(record)
        assert [(m.role, m.content) for m in parsed.messages] == expected
        assert parse_record(record, record_format=name) == parsed  # the format named explicitly: the same


@pytest.mark.parametrize("mode", ["mftcoder", "model"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_trains_the_tokens_of_the_same_chat_rounds(tmp_path, tokenizer, smollm2_tokenizer, name, mode):
    tok = tokenizer if mode == "mftcoder" else smollm2_tokenizer
    reference = write_jsonl(tmp_path / "reference.jsonl",
                            [reference_record(name, line, turns) for line, turns in enumerate(EXPECTED[name], start=1)])
    expected = build([str(reference)], tok, chat_template=mode).train
    got = build([str(FIXTURES / f"{name}.jsonl")], tok, chat_template=mode).train
    assert len(got) == len(expected) == len(EXPECTED[name])
    for line, (ours, reference_row) in enumerate(zip(got, expected), start=1):
        assert ours["input_ids"] == reference_row["input_ids"], (name, line)
        if name == "prompt_completion" and line == 3:
            # The prompt's assistant turn is context: only the completion is trained.
            untrained = [i for i, (a, b) in enumerate(zip(ours["labels"], reference_row["labels"])) if a != b]
            assert all(ours["labels"][i] == IGNORE_INDEX for i in untrained)
            context = tok.decode([ours["input_ids"][i] for i in untrained])
            assert context == ("Hello!\n<|endoftext|>" if mode == "mftcoder" else "Hello!<|im_end|>")
        else:
            assert ours["labels"] == reference_row["labels"], (name, line)


@pytest.mark.parametrize("mode", ["mftcoder", "model"])
def test_text_records_are_plain_text_in_every_mode(tokenizer, smollm2_tokenizer, mode):
    tok = tokenizer if mode == "mftcoder" else smollm2_tokenizer
    (row,) = build([str(FIXTURES / "text.jsonl")], tok, chat_template=mode).train
    assert tok.decode(row["input_ids"]) == "def add(a, b):\n    return a + b\n" + tok.eos_token
    assert row["labels"][1:] == row["input_ids"][1:]


# (format, bad record, problem, words the message must contain)
BAD_RECORDS = [
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}]},
     Problem.UNKNOWN_ROLE, "messages[1] has unknown role 'tool'; expected one of system, human/user, bot/assistant/gpt"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                               {"role": "assistant", "content": "a cat"}]},
     Problem.MULTIMODAL_CONTENT, "messages[0].content[0] is a 'image_url' part; only text parts"),
    ("messages", {"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     Problem.TOOL_USE, "messages[1] has tool calls"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  "tools": [{"type": "function"}]}, Problem.TOOL_USE, "record defines 'tools'"),
    ("messages", {"messages": [{"role": "user", "content": [{"text": "q"}]}, {"role": "assistant", "content": "a"}]},
     Problem.MALFORMED_TURN, 'messages[0].content[0] must be an object with a "type"'),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
     Problem.ROLES_NOT_ALTERNATING, "messages[1] has role 'user' where an assistant turn was expected"),
    ("messages", {"system": "s", "messages": [{"role": "system", "content": "s2"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]},
     Problem.AMBIGUOUS_FORMAT, "both a 'system' field and a first system turn"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     Problem.UNKNOWN_ROLE, "conversations[1] has unknown role 'function_call'"),
    ("sharegpt", {"conversations": [{"from": "human", "text": "q"}]}, Problem.MALFORMED_TURN,
     "conversations[0] must be an object with 'role' and 'content' (or ShareGPT's 'from' and 'value')"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]}, Problem.WRONG_LAST_TURN,
     "'conversations' ends with a user turn"),
    ("prompt_completion", {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
     Problem.MALFORMED_TURN, "'prompt' is str and 'completion' is list; they must be two strings"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     Problem.ROLES_NOT_ALTERNATING, "completion[0] has role 'user' where an assistant turn was expected"),
    ("prompt_completion", {"prompt": "", "completion": "a"}, Problem.EMPTY_CONTENT, "'prompt' is empty"),
    ("alpaca", {"instruction": "q", "input": 3, "output": "a"}, Problem.NON_STRING_CONTENT, "'input' is int"),
    ("alpaca", {"instruction": "q", "output": ["a"]}, Problem.NON_STRING_CONTENT, "'output' is list"),
    ("single_turn", {"query": "q", "answer": 1.5}, Problem.NON_STRING_CONTENT, "'answer' is float"),
    ("text", {"text": "   "}, Problem.EMPTY_CONTENT, "'text' is empty"),
    ("chat_rounds", chat(("human", "q"), ("narrator", "a")), Problem.UNKNOWN_ROLE, "chat_rounds[1] has unknown role"),
    ("auto", {"chosen": "a", "rejected": "b"}, Problem.UNKNOWN_FORMAT, "chosen/rejected is preference data"),
    ("auto", {"messages": [], "text": "t"}, Problem.AMBIGUOUS_FORMAT, "several formats (messages, text)"),
    ("auto", {"prompt": "q", "completion": "a", "answer": "b"}, Problem.AMBIGUOUS_FORMAT,
     "several formats (prompt/completion, prompt/answer)"),
]


@pytest.mark.parametrize("fmt,bad,problem,words", BAD_RECORDS, ids=[f"{f}-{p.name}-{i}" for i, (f, _, p, _) in enumerate(BAD_RECORDS)])
def test_a_bad_record_of_each_format_is_reported_with_file_and_line(tmp_path, fmt, bad, problem, words):
    good = read_fixture(fmt if fmt in EXPECTED or fmt == "text" else "chat_rounds")[0]
    path = write_jsonl(tmp_path / "task.jsonl", [good, "", bad, good])
    result = read_records([path], record_format="auto")
    assert len(result.records) == 2
    (error,) = result.errors
    assert (error.path, error.line, error.problem) == (str(path), 3, problem)
    assert words in error.message, error.message
    assert str(error).startswith(f"{path}:3: ")


def test_record_format_reads_only_that_formats_keys(tmp_path, tokenizer):
    both = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "text": "t"}
    assert parse_record(both, record_format="messages").messages[1].content == "a"
    assert parse_record(both, record_format="text").text == "t"
    with pytest.raises(ValueError, match="record_format is 'sharegpt' for this task"):
        parse_record(both, record_format="sharegpt")
    path = write_jsonl(tmp_path / "mixed" / "x.jsonl", [both, both])
    data = build([str(path.parent)], tokenizer, record_format={"mixed": "text"})
    assert all(tokenizer.decode(r["input_ids"]) == "t\n<|endoftext|>" for r in data.train)
    with pytest.raises(ValueError, match=r"record_format names unknown task\(s\) \['other'\]"):
        build([str(path.parent)], tokenizer, record_format={"other": "text"})
    with pytest.raises(ValueError, match="record_format must be one of"):
        DataConfig(data_paths="x", record_format="openai")


EMPTY_ANSWER = chat(("human", "Any comment?"), ("bot", ""))


@pytest.mark.parametrize("mode", ["mftcoder", "model"])
def test_empty_answers_are_trained_counted_and_warned_about(tmp_path, tokenizer, smollm2_tokenizer, caplog, mode):
    tok = tokenizer if mode == "mftcoder" else smollm2_tokenizer
    path = write_jsonl(tmp_path / "qa" / "x.jsonl", [chat(("human", "q"), ("bot", "a")), EMPTY_ANSWER,
                                                      {"prompt": "p", "completion": ""}])
    data = build([str(path.parent)], tok, chat_template=mode)
    assert data.summary.task("qa").empty_answers == 2
    warning = f"task 'qa' has 2 empty assistant turn(s) ({path}:2, {path}:3): trained as empty answers"
    assert any(warning in w for w in data.summary.warnings)
    assert warning in caplog.text
    empty = data.train[1]
    trained = tok.decode([t for t, label in zip(empty["input_ids"], empty["labels"]) if label != IGNORE_INDEX])
    # MFTCoder's "\n" + EOS; in a template, the template's rendering of an empty content and its end of turn.
    assert trained == ("\n<|endoftext|>" if mode == "mftcoder" else "<|im_end|>")
    assert "empty" in str(data.summary).splitlines()[1]  # a column of the table

    with pytest.raises(DataValidationError) as info:
        build([str(path.parent)], tok, chat_template=mode, empty_answers="invalid")
    assert [(e.line, e.problem) for e in info.value.errors] == [(2, Problem.EMPTY_CONTENT), (3, Problem.EMPTY_CONTENT)]
    assert "chat_rounds[1].content (bot) is empty" in str(info.value)


def test_empty_system_turn_means_no_system_prompt():
    record = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    assert [m.role for m in parse_record(record).messages] == ["user", "assistant"]
    assert [m.role for m in parse_record({**record, "system": " "}).messages] == ["user", "assistant"]


def test_input_format_values_are_documented():
    text = (REPO / "docs" / "data_format.md").read_text()
    for fmt in InputFormat:
        assert f"`{fmt.value}`" in text, fmt


def without_last_answer(name: str, record: dict) -> dict:
    """The record as a batch-inference request: the final answer left out."""
    record = dict(record)
    for key in ("chat_rounds", "messages", "conversations"):
        if key in record:
            record[key] = record[key][:-1]
    for key in ("completion", "output", "answer", "response"):
        record.pop(key, None)
    return record


@pytest.mark.parametrize("mode", ["mftcoder", "model"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_batch_inference_prompts_of_every_format_are_the_training_prompts(tokenizer, smollm2_tokenizer, name, mode):
    from mft_trainer import build_inference_prompt, render_conversation

    tok = tokenizer if mode == "mftcoder" else smollm2_tokenizer
    for record in read_fixture(name):
        trained = render_conversation(record, tok, chat_template=mode)
        prompt = build_inference_prompt(without_last_answer(name, record), tok, chat_template=mode)
        n = len(prompt.input_ids)
        assert trained["input_ids"][:n] == prompt.input_ids, record
        assert trained["labels"][n - 1] == IGNORE_INDEX and trained["labels"][n] != IGNORE_INDEX  # the answer starts
