"""Building the multi-task dataset: counts, over-length policy, split, validation files, cache."""

import logging
import os
import time
from pathlib import Path

import pytest

from mft_trainer import DataConfig, DataValidationError, build_mft_dataset
from mft_trainer.splitting import parse_data_split, split_indices

from .helpers import chat, write_jsonl


def config(paths, **kwargs) -> DataConfig:
    kwargs.setdefault("dataset_cache_dir", "none")
    return DataConfig(data_paths=paths, **kwargs)


def answer_of_length(tokenizer, n_tokens: int) -> str:
    """A bot answer that tokenizes to exactly n_tokens GPT-2 tokens (" a" is one token)."""
    text = "a" + " a" * (n_tokens - 1)
    assert len(tokenizer.encode(text)) == n_tokens
    return text


def test_example_data_summary_counts(tokenizer, example_task_dirs):
    data = build_mft_dataset(config(example_task_dirs, data_split="80,20"), tokenizer)
    summary = data.summary
    assert data.tasks.names == ("code_generation", "code_qa", "multi_round_chat", "code_completion")
    assert [t.records for t in summary.tasks] == [48, 24, 16, 12]
    for task_id, task in enumerate(summary.tasks):
        rows = [r for r in [*data.train, *data.valid] if r["task_id"] == task_id]
        assert task.samples == len(rows) == task.train_samples + task.valid_samples
        assert task.tokens == sum(len(r["input_ids"]) for r in rows)
        assert task.trained_tokens == sum(sum(label != -100 for label in r["labels"]) for r in rows)
        assert task.valid_samples == -(-task.records * 20 // 100)  # rounded up
    assert summary.total.samples == 100
    assert summary.to_dict()["total"]["samples"] == 100
    text = str(summary)
    assert "code_generation" in text and "total" in text and "trained" in text
    assert data.train.column_names == ["input_ids", "labels", "task_id"]


def test_split_is_deterministic_and_independent_of_other_tasks(tokenizer, example_task_dirs):
    def valid_rows(paths, seed):
        data = build_mft_dataset(config(paths, data_split="70,30", split_seed=seed), tokenizer)
        qa = data.tasks.id_of("code_qa")
        return sorted(tuple(r["input_ids"]) for r in data.valid if r["task_id"] == qa)

    first = valid_rows(example_task_dirs, seed=1)
    assert valid_rows(example_task_dirs, seed=1) == first
    assert valid_rows([p for p in example_task_dirs if p.endswith("code_qa")], seed=1) == first
    assert valid_rows(example_task_dirs, seed=2) != first


def test_split_indices_partition_and_keep_one_train_sample():
    train, valid = split_indices(50, 0.1, seed=3, task="t")
    assert sorted(train + valid) == list(range(50)) and len(valid) == 5
    assert split_indices(1, 0.5, seed=3, task="t") == ([0], [])
    assert split_indices(2, 0.02, seed=3, task="t")[1] != []


@pytest.mark.parametrize("value,expected", [("98,2,0", (0.98, 0.02)), ("9,1", (0.9, 0.1)), ([100, 0], (1.0, 0.0))])
def test_parse_data_split(value, expected):
    assert parse_data_split(value) == pytest.approx(expected)


@pytest.mark.parametrize("value,message", [("98", "invalid"), ("a,b", "not a list of numbers"), ("90,5,5", "test part"), ("0,1", "invalid")])
def test_parse_data_split_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_data_split(value)


def test_too_small_task_gets_a_warning_not_a_crash(tmp_path, tokenizer, caplog):
    big = write_jsonl(tmp_path / "big" / "x.jsonl", [chat(("human", f"q{i}"), ("bot", "a")) for i in range(10)])
    tiny = write_jsonl(tmp_path / "tiny" / "x.jsonl", [chat(("human", "q"), ("bot", "a"))])
    with caplog.at_level(logging.WARNING):
        data = build_mft_dataset(config([str(big.parent), str(tiny.parent)], data_split="90,10"), tokenizer)
    assert (data.summary.task("tiny").train_samples, data.summary.task("tiny").valid_samples) == (1, 0)
    assert data.summary.task("big").valid_samples == 1
    assert any("'tiny' has only 1 sample" in w for w in data.summary.warnings)
    assert "'tiny' has only 1 sample" in caplog.text


def overlength_task(tmp_path, tokenizer):
    """Four records: two short, one long with a long answer, one whose long prompt leaves no answer in 32 tokens."""
    rows = [
        chat(("human", "q"), ("bot", "short")),
        chat(("human", "q"), ("bot", "short too")),
        chat(("human", "q"), ("bot", answer_of_length(tokenizer, 60))),
        chat(("human", answer_of_length(tokenizer, 60)), ("bot", "a")),
    ]
    return write_jsonl(tmp_path / "t" / "x.jsonl", rows).parent


def test_overlength_drop_counts(tmp_path, tokenizer):
    data = build_mft_dataset(config([str(overlength_task(tmp_path, tokenizer))], seq_length=32, data_split="100,0"), tokenizer)
    task = data.summary.task("t")
    assert (task.records, task.dropped_too_long, task.truncated, task.dropped_no_trained_token, task.samples) == (4, 2, 0, 0, 2)
    assert all(len(r["input_ids"]) <= 32 for r in data.train)


def test_overlength_truncate_counts_and_drops_samples_without_loss(tmp_path, tokenizer):
    cfg = config([str(overlength_task(tmp_path, tokenizer))], seq_length=32, data_split="100,0", overlength_policy="truncate")
    data = build_mft_dataset(cfg, tokenizer)
    task = data.summary.task("t")
    assert (task.dropped_too_long, task.truncated, task.dropped_no_trained_token, task.samples) == (0, 1, 1, 3)
    lengths = sorted(len(r["input_ids"]) for r in data.train)
    assert lengths[-1] == 32
    truncated = next(r for r in data.train if len(r["input_ids"]) == 32)
    assert truncated["labels"][-1] != -100  # the kept part of the answer is still trained


def test_all_samples_too_long_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t" / "x.jsonl", [chat(("human", "q"), ("bot", answer_of_length(tokenizer, 60)))])
    with pytest.raises(ValueError, match="no sample left.*seq_length 16"):
        build_mft_dataset(config([str(path.parent)], seq_length=16), tokenizer)


def test_all_samples_without_trained_tokens_after_truncation_suggests_only_a_longer_seq_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t" / "x.jsonl", [chat(("human", answer_of_length(tokenizer, 60)), ("bot", "a"))])
    with pytest.raises(ValueError) as error:
        build_mft_dataset(config([str(path.parent)], seq_length=16, overlength_policy="truncate"), tokenizer)
    message = str(error.value)
    assert "no sample left" in message and "keep no trained token" in message and "raise seq_length" in message
    assert "use overlength_policy 'truncate'" not in message  # the policy already in use


def test_explicit_validation_files(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "train" / "a.jsonl", [chat(("human", f"q{i}"), ("bot", "a")) for i in range(5)])
    b = write_jsonl(tmp_path / "train" / "b.jsonl", [chat(("human", "q"), ("bot", "b"))] * 3)
    va = write_jsonl(tmp_path / "valid" / "a.jsonl", [chat(("human", "v"), ("bot", "a"))] * 2)
    data = build_mft_dataset(config([str(a), str(b)], valid_data_paths=[str(va)]), tokenizer)
    assert (data.summary.task("a").train_samples, data.summary.task("a").valid_samples) == (5, 2)
    assert (data.summary.task("b").train_samples, data.summary.task("b").valid_samples) == (3, 0)
    assert any("'b' has no file in valid_data_paths" in w for w in data.summary.warnings)
    assert len(data.valid) == 2 and set(data.valid["task_id"]) == {data.tasks.id_of("a")}

    stray = write_jsonl(tmp_path / "valid" / "c.jsonl", [chat(("human", "v"), ("bot", "c"))])
    with pytest.raises(ValueError, match=r"valid_data_paths has task\(s\) \['c'\]"):
        build_mft_dataset(config([str(a)], valid_data_paths=[str(stray)]), tokenizer)


def test_no_validation_part_gives_valid_none(tokenizer, example_task_dirs):
    data = build_mft_dataset(config(example_task_dirs[:1], data_split="100,0"), tokenizer)
    assert data.valid is None and len(data.train) == 48


def test_tokenization_is_cached_and_parallel_gives_the_same(tmp_path, tokenizer, example_task_dirs):
    cache = tmp_path / "cache"
    first = build_mft_dataset(config(example_task_dirs, dataset_cache_dir=str(cache)), tokenizer)
    cache_files = sorted(p.name for p in cache.glob("*.arrow"))
    assert len(cache_files) == 8  # per task: its validated records (records-*) and its tokenized samples
    assert sum(name.startswith("records-") for name in cache_files) == 4
    second = build_mft_dataset(config(example_task_dirs, dataset_cache_dir=str(cache)), tokenizer)
    assert sorted(p.name for p in cache.glob("*.arrow")) == cache_files  # reused, not rebuilt
    assert second.train.to_list() == first.train.to_list()
    # A different render setting is a different tokenization of the same validated records.
    build_mft_dataset(config(example_task_dirs, dataset_cache_dir=str(cache), seq_length=1024), tokenizer)
    assert len(list(cache.glob("*.arrow"))) == 12 and len(list(cache.glob("records-*.arrow"))) == 4
    parallel = build_mft_dataset(config(example_task_dirs, tokenize_num_proc=2), tokenizer)
    assert parallel.train.to_list() == first.train.to_list()


@pytest.mark.parametrize("padding_mode,damaged", [("padding", "code_qa-*.arrow"), ("pack", "rows-*.arrow")])
def test_a_truncated_cache_file_is_named_and_built_again(tmp_path, tokenizer, example_task_dirs, caplog, padding_mode,
                                                        damaged):
    cache = tmp_path / "cache"
    settings = dict(dataset_cache_dir=str(cache), padding_mode=padding_mode, seq_length=512)
    expected = build_mft_dataset(config(example_task_dirs[:2], **settings), tokenizer).train.to_list()
    broken = sorted(cache.glob(damaged))[0]  # (after the read above: the first build maps this file)
    os.truncate(broken, broken.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="mft_trainer"):
        second = build_mft_dataset(config(example_task_dirs[:2], **settings), tokenizer)
    assert f"the cache file {broken} cannot be read (Expected to be able to read" in caplog.text
    assert "removed, it is built again" in caplog.text
    assert second.train.to_list() == expected


def test_temporary_files_of_a_killed_tokenization_are_removed(tmp_path, tokenizer, example_task_dirs):
    """datasets.map writes into tmpXXXXXXXX and renames it at the end; a killed run leaves it there."""
    cache = tmp_path / "cache"
    cache.mkdir()
    abandoned, live = cache / "tmpa1b2c3d4", cache / "tmpz9y8x7w6"
    for path in (abandoned, live):
        path.write_bytes(b"half a tokenized task")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    build_mft_dataset(config(example_task_dirs[:1], dataset_cache_dir=str(cache)), tokenizer)
    assert not abandoned.exists()
    assert live.exists()  # written to a moment ago: it may be another run's map at work


def test_role_markers_and_eos_reach_the_dataset(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t" / "x.jsonl", [chat(("human", "q"), ("bot", "a"))])
    data = build_mft_dataset(
        config([str(path.parent)], data_split="100,0", role_markers={"user": "U:", "assistant": "A:"}, eos_token="ĊĊ"),
        tokenizer,
    )
    assert tokenizer.decode(data.train[0]["input_ids"]) == "U:q\nA:a\n\n\n\n"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"data_paths": None}, "data_paths is required"),
        ({"data_paths": ["x"], "seq_length": 0}, "seq_length must be a positive integer"),
        ({"data_paths": ["x"], "overlength_policy": "cut"}, "overlength_policy must be one of"),
        ({"data_paths": ["x"], "valid_data_paths": ["y"], "data_split": "90,10"}, "use one of them"),
        ({"data_paths": ["x"], "role_markers": {"bot": 1}}, "must be a string"),
        ({"data_paths": ["x"], "tokenize_num_proc": 0}, "tokenize_num_proc"),
    ],
)
def test_data_config_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DataConfig(**kwargs)


def test_data_config_defaults():
    assert DataConfig(data_paths="x").data_split == "98,2"
    assert DataConfig(data_paths="x", valid_data_paths="y").data_split == "100,0"


def test_shared_data_builds_and_accounts_for_every_record(tokenizer):
    """The full shared multi-task data (when present beside the checkout): its two records with an
    empty answer are trained (as MFTCoder does), counted and named, and every line is accounted for."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    paths = [str(shared / t) for t in ("code_generation", "code_qa", "code_completion", "multi_round_chat")]
    data = build_mft_dataset(config(paths), tokenizer)
    assert [t.records for t in data.summary.tasks] == [4535, 2017, 164, 500]
    code_qa = data.summary.task("code_qa")
    assert code_qa.empty_answers == 2 and code_qa.skipped_invalid == 0
    assert [Path(s).name for s in code_qa.empty_answer_examples] == ["train.jsonl:238", "train.jsonl:1860"]
    assert any("task 'code_qa' has 2 empty assistant turn(s)" in w for w in data.summary.warnings)
    with pytest.raises(DataValidationError) as info:
        build_mft_dataset(config(paths, empty_answers="invalid"), tokenizer)
    assert [(Path(e.path).parent.name, e.line) for e in info.value.errors] == [("code_qa", 238), ("code_qa", 1860)]
    total = data.summary.total
    assert total.samples + total.dropped_too_long == 7216  # every line of the four files
    assert all(t.valid_samples > 0 for t in data.summary.tasks)
