"""Task sources: json, jsonl, parquet, csv and arrow files (extensions in any case), save_to_disk
directories and `datasets` specs all train the same tokens as the same records in jsonl; bad records
in each are errors naming the file and line (or row); directories are searched without dropping
anything silently."""

import csv
import json
import logging
import os
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from mft_trainer import DataConfig, DataValidationError, Problem, build_mft_dataset, resolve_task_sources
from mft_trainer.reading import read_records

from .helpers import chat, write_jsonl

RECORDS = [
    chat(("system", "Be brief."), ("human", "What is 2+2?"), ("bot", "4")),
    {"prompt": "Reverse a string.", "answer": "s[::-1]"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]
# The same records as one table: the union of their keys, null where a record has none.
TABLE_ROWS = [{key: record.get(key) for key in ("chat_rounds", "prompt", "answer", "messages")} for record in RECORDS]


def build(paths, tokenizer, **kwargs):
    kwargs.setdefault("dataset_cache_dir", "none")
    return build_mft_dataset(DataConfig(data_paths=paths, data_split="100,0", **kwargs), tokenizer)


@pytest.fixture
def expected(tmp_path, tokenizer):
    """The samples of RECORDS read from jsonl."""
    return build([str(write_jsonl(tmp_path / "reference.jsonl", RECORDS))], tokenizer).train.to_list()


def write_csv(path: Path, rows: list[dict], encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


PAIRS = [{"system": "Be brief.", "prompt": "What is 2+2?", "answer": "4"}, {"system": "", "prompt": "Hi", "answer": "Hello!"}]


@pytest.mark.parametrize("writer", ["parquet", "arrow", "json_array", "json_lines", "save_to_disk", "dataset_dict",
                                    "spec_saved", "spec_json_builder"])
def test_every_source_reads_the_same_samples_as_jsonl(tmp_path, tokenizer, expected, writer):
    table = Dataset.from_list(TABLE_ROWS)
    if writer == "parquet":
        path = tmp_path / "task" / "part.PARQUET"  # extensions in any case
        path.parent.mkdir()
        table.to_parquet(str(path))
    elif writer == "arrow":
        table.save_to_disk(str(tmp_path / "saved"))
        path = tmp_path / "task.arrow"
        next((tmp_path / "saved").glob("*.arrow")).rename(path)
    elif writer == "json_array":
        path = tmp_path / "task.json"
        path.write_text(json.dumps(RECORDS, indent=2))
    elif writer == "json_lines":
        path = write_jsonl(tmp_path / "task.json", RECORDS)
    elif writer == "save_to_disk":
        path = tmp_path / "task"
        table.save_to_disk(str(path))
    elif writer == "dataset_dict":  # a directory holding a saved DatasetDict, found by the search
        DatasetDict({"train": table}).save_to_disk(str(tmp_path / "task" / "saved"))
        path = tmp_path / "task"
    elif writer == "spec_saved":
        DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
        path = {"path": str(tmp_path / "saved"), "split": "train"}
    else:
        data_file = write_jsonl(tmp_path / "records.jsonl", RECORDS)
        path = {"path": "json", "data_files": [str(data_file)]}
    data = build({"task": path}, tokenizer)
    assert data.train.to_list() == expected
    assert len(data.summary.task("task").sources) == 1


def test_csv_with_a_byte_order_mark_and_empty_cells(tmp_path, tokenizer):
    path = write_csv(tmp_path / "pairs.CSV", PAIRS, encoding="utf-8-sig")
    reference = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert build([str(path)], tokenizer).train.to_list() == build([str(reference)], tokenizer).train.to_list()


def test_a_jsonl_byte_order_mark_and_a_line_separator_inside_a_string(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(chat(("human", "a\u2028b"), ("bot", "c")), ensure_ascii=False), "{bad"]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n")
    result = read_records([path])
    assert result.records[0]["messages"][0]["content"] == "a\u2028b"  # U+2028 ends no line
    assert [(e.line, e.problem) for e in result.errors] == [(2, Problem.MALFORMED_JSON)]


def test_a_lone_surrogate_is_an_error_with_its_line_not_a_crash(tmp_path, tokenizer):
    path = tmp_path / "t" / "x.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "ok"}\n{"chat_rounds": [{"role": "human", "content": "q"}, '
                    '{"role": "bot", "content": "broken \\ud800 half"}]}\n{"text": "also ok"}\n')
    with pytest.raises(DataValidationError) as info:
        build([str(path.parent)], tokenizer)
    (error,) = info.value.errors
    assert (error.line, error.problem) == (2, Problem.INVALID_TEXT)
    assert "turn 1 (assistant) holds a lone surrogate '\\ud800' at character 7" in str(error)
    data = build([str(path.parent)], tokenizer, skip_invalid_records=True)
    assert data.summary.task("t").skipped_reasons == {"invalid text": 1} and len(data.train) == 2


def test_invalid_utf8_is_malformed_json_with_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (error,) = read_records([path]).errors
    assert (error.line, error.problem) == (2, Problem.MALFORMED_JSON)
    assert "not valid UTF-8" in error.message


def test_bad_records_of_tables_are_named_by_file_and_row(tmp_path, tokenizer):
    parquet = tmp_path / "t" / "a.parquet"
    parquet.parent.mkdir()
    Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                       {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}]).to_parquet(str(parquet))
    table_csv = write_csv(tmp_path / "t" / "b.csv", [{"prompt": "q", "answer": "a"}, {"prompt": "", "answer": "a"}])
    with pytest.raises(DataValidationError) as info:
        build([str(parquet.parent)], tokenizer)
    message = str(info.value)
    assert f"{parquet}: row 1: messages[1] has unknown role 'tool'" in message
    # An empty csv cell is null: the record then has no prompt.
    assert f"{table_csv}: row 1: no known format" in message
    assert [(e.path, e.line, e.unit) for e in info.value.errors] == [(str(parquet), 1, "row"), (str(table_csv), 1, "row")]


def test_json_array_records_are_named_by_their_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": ""},\n  {"text": "c"} ,\n  {"text": \n]\n')
    result = read_records([path])
    assert [r["text"] for r in result.records] == ["a", "c"]
    assert [(e.line, e.problem) for e in result.errors] == [(3, Problem.EMPTY_CONTENT), (6, Problem.MALFORMED_JSON)]
    assert "the rest of this JSON array cannot be read" in result.errors[1].message


def test_an_unreadable_file_is_named(tmp_path, tokenizer):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=f"{path}: datasets cannot read it"):
        build([str(path)], tokenizer)


def test_discovery_reads_or_reports_everything_it_finds(tmp_path, tokenizer, caplog):
    task = tmp_path / "task"
    write_jsonl(task / "a.JSONL", [RECORDS[0]])  # upper-case extension
    write_jsonl(task / "b.jsonl", [RECORDS[1]])
    write_jsonl(tmp_path / "elsewhere" / "c.jsonl", [RECORDS[2]])
    os.symlink(tmp_path / "elsewhere", task / "linked")  # a symlinked directory is read
    os.symlink(task, task / "linked" / "loop")  # and a loop back is read once
    os.symlink(tmp_path / "gone.jsonl", task / "dangling.jsonl")
    write_jsonl(task / ".ipynb_checkpoints" / "b-checkpoint.jsonl", [RECORDS[1]])
    (task / "README.md").write_text("about this data")
    saved = task / "saved"
    Dataset.from_list([{"text": "from a saved dataset"}]).save_to_disk(str(saved))

    with caplog.at_level(logging.WARNING):
        data = build([str(task)], tokenizer)
    summary = data.summary.task("task")
    assert [Path(p).relative_to(task).as_posix() for p in summary.sources] == [
        "a.JSONL", "b.jsonl", "linked/c.jsonl", "saved"]
    assert summary.records == 4 and summary.files == 4
    not_read = {Path(s.split(" (")[0]).name: s.split(" (", 1)[1] for s in summary.not_read}
    assert not_read == {
        ".ipynb_checkpoints": "Jupyter's autosaved copies, not data)",
        "README.md": "not a data file)",
        "dangling.jsonl": f"a symbolic link to {tmp_path / 'gone.jsonl'}, which does not exist)",
        "loop": f"a symbolic link to {task}, which is read already)",
    }
    assert f"not read: {task / 'dangling.jsonl'} (a symbolic link" in caplog.text  # a data file that is missing
    text = str(data.summary)
    assert f"task: read 4 source(s): {task / 'a.JSONL'}, {task / 'b.jsonl'}" in text and "not read: " in text


def test_a_datasets_spec_is_loaded_with_its_arguments_and_a_local_path_never_reaches_the_hub(monkeypatch, tmp_path,
                                                                                          tokenizer, expected):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return Dataset.from_list(TABLE_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = {"path": "org/mft-data", "name": "chat", "split": "train[:3]", "revision": "v1"}
    data = build({"hub": spec}, tokenizer)
    assert calls == [("org/mft-data", {"name": "chat", "split": "train[:3]", "data_files": None, "revision": "v1"})]
    assert data.train.to_list() == expected
    assert data.summary.task("hub").sources == ["org/mft-data (chat) [train[:3]]"]

    calls.clear()
    with pytest.raises(FileNotFoundError, match="datasets path './data/missing' does not exist.*not a hub dataset id"):
        build([{"path": "./data/missing"}], tokenizer)
    with pytest.raises(FileNotFoundError, match="data path 'org/missing' does not exist"):
        build(["org/missing"], tokenizer)  # a plain data path is always local
    assert calls == []
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['splits'\]"):
        build([{"path": "org/x", "splits": "train"}], tokenizer)
    with pytest.raises(ValueError, match="data_paths is one datasets spec"):
        build({"path": "org/x", "split": "train"}, tokenizer)


def test_a_dataset_dict_needs_a_split(tmp_path, tokenizer):
    table = Dataset.from_list(TABLE_ROWS)
    DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"a DatasetDict with splits \['train', 'test'\]; name one"):
        build([str(tmp_path / "saved")], tokenizer)
    data = build([{"path": str(tmp_path / "saved"), "split": "test"}], tokenizer)
    assert len(data.train) == 3


def test_parallel_validation_gives_the_same_records(tmp_path, tokenizer):
    rows = [chat(("human", f"q{i}"), ("bot", f"a{i}")) for i in range(50)] + ["{bad"]
    path = write_jsonl(tmp_path / "t" / "x.jsonl", rows)
    serial = build([str(path.parent)], tokenizer, skip_invalid_records=True, dataset_cache_dir=str(tmp_path / "c1"))
    parallel = build([str(path.parent)], tokenizer, skip_invalid_records=True, tokenize_num_proc=2,
                     dataset_cache_dir=str(tmp_path / "c2"))
    assert parallel.train.to_list() == serial.train.to_list()
    assert parallel.summary.task("t").skipped_reasons == {"malformed JSON": 1}


def test_check_paths_accepts_every_source(tmp_path):
    table = Dataset.from_list(TABLE_ROWS)
    table.to_parquet(str(tmp_path / "x.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    sources = resolve_task_sources([str(tmp_path / "x.parquet"), str(tmp_path / "saved"), {"path": "org/name"}])
    assert [found.sources[0].kind.value for found in sources.values()] == ["parquet", "saved", "datasets"]
    assert list(sources) == ["x", "saved", "name"]
