"""Bad input gets an error naming the file, the line, what is wrong and what is expected."""

import pytest

from mft_trainer import DataConfig, DataValidationError, Problem, build_mft_dataset, parse_record
from mft_trainer.reading import read_records

from .helpers import chat, write_jsonl

GOOD = chat(("human", "q"), ("bot", "a"))

# (raw line or record, problem, words the message must contain)
BAD_RECORDS = [
    ('{"chat_rounds": [', Problem.MALFORMED_JSON, "malformed JSON"),
    ("[1, 2]", Problem.NOT_AN_OBJECT, "expected a JSON object"),
    ({"question_text": "q", "reply": "a"}, Problem.UNKNOWN_FORMAT, "prompt/answer"),
    ({"prompt": "q", "answer": "a", "response": "r"}, Problem.AMBIGUOUS_FORMAT, "prompt/answer, prompt/response"),
    ({"text": "t", **GOOD}, Problem.AMBIGUOUS_FORMAT, "chat_rounds, text"),
    (chat(("human", "q"), ("narrator", "a")), Problem.UNKNOWN_ROLE, "chat_rounds[1] has unknown role 'narrator'"),
    (chat(("human", "q"), ("human", "q2"), ("bot", "a")), Problem.ROLES_NOT_ALTERNATING, "chat_rounds[1]"),
    (chat(("bot", "a"), ("human", "q"), ("bot", "a")), Problem.ROLES_NOT_ALTERNATING, "chat_rounds[0]"),
    (chat(("human", "q"), ("bot", "a"), ("system", "s")), Problem.SYSTEM_NOT_FIRST, "chat_rounds[2] is a system turn"),
    (chat(("human", "q"), ("bot", "a"), ("human", "q2")), Problem.WRONG_LAST_TURN, "ends with a user turn"),
    (chat(("system", "s")), Problem.WRONG_LAST_TURN, "ends with a system turn"),
    (chat(("human", "   "), ("bot", "a")), Problem.EMPTY_CONTENT, "chat_rounds[0].content (human) is empty"),
    (chat(("human", 3), ("bot", "a")), Problem.NON_STRING_CONTENT, "chat_rounds[0].content (human) is int"),
    (chat(("human", "q"), ("bot", None)), Problem.NON_STRING_CONTENT, "is NoneType"),
    ({"chat_rounds": [{"role": "human"}]}, Problem.MALFORMED_TURN, "chat_rounds[0] must be an object"),
    ({"chat_rounds": []}, Problem.MALFORMED_TURN, "non-empty list"),
    ({"chat_rounds": "hello"}, Problem.MALFORMED_TURN, "non-empty list"),
    ({"prompt": "", "answer": "a"}, Problem.EMPTY_CONTENT, "'prompt' is empty"),
    ({"prompt": ["q"], "answer": "a"}, Problem.NON_STRING_CONTENT, "'prompt' is list"),
    ({"prompt": "q", "answer": "a", "system": 5}, Problem.NON_STRING_CONTENT, "'system' is int"),
    ({"text": ""}, Problem.EMPTY_CONTENT, "'text' is empty"),
]


@pytest.mark.parametrize("bad,problem,words", BAD_RECORDS, ids=[p.name + str(i) for i, (_, p, _) in enumerate(BAD_RECORDS)])
def test_bad_record_is_reported_with_file_line_and_reason(tmp_path, bad, problem, words):
    path = write_jsonl(tmp_path / "task" / "part.jsonl", [GOOD, "", GOOD, bad, GOOD])
    result = read_records([path])
    assert len(result.records) == 3
    assert len(result.errors) == 1
    error = result.errors[0]
    assert (error.path, error.line, error.problem) == (str(path), 4, problem)
    assert words in error.message
    assert str(error).startswith(f"{path}:4: ")


def test_invalid_utf8_is_malformed_json(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (error,) = read_records([path]).errors
    assert (error.line, error.problem) == (2, Problem.MALFORMED_JSON)


def test_build_stops_listing_errors_with_files_and_lines(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a" / "x.jsonl", [GOOD, chat(("human", "q"))])
    b = write_jsonl(tmp_path / "b" / "y.jsonl", ["not json", GOOD])
    with pytest.raises(DataValidationError) as info:
        build_mft_dataset(DataConfig(data_paths=[str(a.parent), str(b.parent)], dataset_cache_dir="none"), tokenizer)
    message = str(info.value)
    assert f"{a}:2: 'chat_rounds' ends with a user turn" in message
    assert f"{b}:1: malformed JSON" in message
    assert "skip_invalid_records" in message  # says how to go on
    assert [(e.path, e.line) for e in info.value.errors] == [(str(a), 2), (str(b), 1)]


def test_error_list_is_capped_at_twenty(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t" / "x.jsonl", [GOOD] + ["{bad"] * 25)
    with pytest.raises(DataValidationError) as info:
        build_mft_dataset(DataConfig(data_paths=[str(path.parent)], dataset_cache_dir="none"), tokenizer)
    message = str(info.value)
    assert len(info.value.errors) == 25
    assert message.count("malformed JSON") == 20
    assert "... and 5 more" in message
    assert f"{path}:21:" in message and f"{path}:22:" not in message


def test_skip_invalid_records_counts_per_task_and_reason(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a" / "x.jsonl", [GOOD] * 3 + ["{bad", chat(("human", "q"))])
    b = write_jsonl(tmp_path / "b" / "y.jsonl", [GOOD] * 2 + [chat(("human", ""), ("bot", "a"))] * 2)
    config = DataConfig(data_paths=[str(a.parent), str(b.parent)], skip_invalid_records=True, dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)
    task_a, task_b = data.summary.task("a"), data.summary.task("b")
    assert (task_a.records, task_a.skipped_invalid, task_a.samples) == (3, 2, 3)
    assert task_a.skipped_reasons == {"malformed JSON": 1, "wrong last turn": 1}
    assert (task_b.records, task_b.skipped_invalid) == (2, 2)
    assert task_b.skipped_reasons == {"empty content": 2}
    assert len(data.train) + len(data.valid) == 5
    assert "skipped in a: malformed JSON: 1, wrong last turn: 1" in str(data.summary)


def test_task_with_no_valid_record_is_an_error(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a" / "x.jsonl", [GOOD])
    empty = write_jsonl(tmp_path / "empty" / "x.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="task 'empty' has no valid record"):
        build_mft_dataset(DataConfig(data_paths=[str(a.parent), str(empty.parent)], dataset_cache_dir="none"), tokenizer)
    bad = write_jsonl(tmp_path / "bad" / "x.jsonl", ["{"])
    config = DataConfig(data_paths=[str(a.parent), str(bad.parent)], skip_invalid_records=True, dataset_cache_dir="none")
    with pytest.raises(ValueError, match="task 'bad' has no valid record.*1 invalid record"):
        build_mft_dataset(config, tokenizer)


def test_parse_record_normalises_roles():
    record = parse_record(chat(("system", "s"), ("human", "q"), ("gpt", "a")))
    assert [m.role for m in record.messages] == ["system", "user", "assistant"]
