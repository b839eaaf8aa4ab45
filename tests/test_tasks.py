"""Task discovery (directories, files, mappings) and the task registry."""

import json
from pathlib import Path

import pytest

from mft_trainer import TaskRegistry, resolve_task_sources

from .helpers import chat, write_jsonl

GOOD = chat(("human", "q"), ("bot", "a"))


def paths_of(found) -> list[str]:
    return [source.path for source in found.sources]


def test_directory_is_searched_recursively_and_named_by_its_last_component(tmp_path):
    write_jsonl(tmp_path / "code_qa" / "b.jsonl", [GOOD])
    write_jsonl(tmp_path / "code_qa" / "nested" / "a.jsonl", [GOOD])
    (tmp_path / "code_qa" / "notes.txt").write_text("not read: not a data file")
    sources = resolve_task_sources(str(tmp_path / "code_qa") + "/")
    assert list(sources) == ["code_qa"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths_of(sources["code_qa"])] == [
        "code_qa/b.jsonl", "code_qa/nested/a.jsonl"]
    assert [(Path(s.path).name, s.reason.split(":")[0]) for s in sources["code_qa"].skipped] == [
        ("notes.txt", "not a data file")]


def test_single_file_task_is_named_by_its_stem(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    assert paths_of(resolve_task_sources([str(path)])["chat"]) == [str(path)]


def test_mapping_names_tasks_and_merges_paths(tmp_path):
    a = write_jsonl(tmp_path / "x" / "train.jsonl", [GOOD])
    b = write_jsonl(tmp_path / "y" / "train.jsonl", [GOOD])
    sources = resolve_task_sources({"qa": [str(a), str(b.parent)], "other": str(b)})
    assert {name: paths_of(found) for name, found in sources.items()} == {"qa": [str(a), str(b)], "other": [str(b)]}


def test_two_tasks_with_the_same_name_are_an_error(tmp_path):
    a = write_jsonl(tmp_path / "x" / "train.jsonl", [GOOD])
    b = write_jsonl(tmp_path / "y" / "train.jsonl", [GOOD])
    with pytest.raises(ValueError, match="two tasks are named 'train'.*mapping"):
        resolve_task_sources([str(a), str(b)])


def test_bad_paths_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_task_sources([str(tmp_path / "missing")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="contains no data file"):
        resolve_task_sources([str(tmp_path / "empty_dir")])
    (tmp_path / "data.txt").write_text("{}")
    with pytest.raises(ValueError, match=r"is not a data file: expected \.jsonl, \.json, \.parquet, \.csv, \.arrow"):
        resolve_task_sources([str(tmp_path / "data.txt")])
    with pytest.raises(ValueError, match="no data paths"):
        resolve_task_sources([])


def test_registry_ids_weights_and_round_trip(tmp_path):
    tasks = TaskRegistry.from_names(["a", "b", "c"], weights={"b": 2.5})
    assert (tasks.id_of("c"), tasks.name_of(1), tasks.weights) == (2, "b", (1.0, 2.5, 1.0))
    path = tasks.save(tmp_path)
    assert json.loads(path.read_text())["tasks"][1] == {"id": 1, "name": "b", "weight": 2.5}
    assert TaskRegistry.load(tmp_path) == tasks
    assert tasks.with_weights({"a": 0.5}).weights == (0.5, 1.0, 1.0)
    with pytest.raises(KeyError, match="unknown task 'd'"):
        tasks.id_of("d")


@pytest.mark.parametrize(
    "names,weights,message",
    [
        (["a", "a"], None, "unique"),
        (["a"], {"b": 1.0}, "unknown task"),
        (["a"], {"a": -1.0}, ">= 0"),
        (["a"], {"a": float("nan")}, "finite"),
        (["a", "b"], {"a": 0.0, "b": 0.0}, "at least one"),
    ],
)
def test_registry_rejects_bad_input(names, weights, message):
    with pytest.raises(ValueError, match=message):
        TaskRegistry.from_names(names, weights)


def test_registry_is_immutable():
    tasks = TaskRegistry.from_names(["a"])
    with pytest.raises(AttributeError):
        tasks.names = ("b",)
