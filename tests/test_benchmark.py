"""scripts/benchmarks/benchmark.py end to end on the CPU: a tiny model, a few example conversations, one epoch.

The sizes are chosen so that the rows' steps cover the data exactly once (two optimizer steps), so
the tokens the harness counted while training can be checked against the data itself.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mft_trainer import DataConfig, build_mft_dataset
from mft_trainer.packing import pack_dataset

from .conftest import EXAMPLE_DATA, EXAMPLE_TASKS, REPO, TOKENIZER_DIR

# 3 records per task: one of each goes to validation (the CoBa row's batches), the other 8 make two steps
# of 4 conversations, padded in micro-batches of 2 (with 2 records per task a micro-batch would hold one
# conversation and pad nothing). No more: the rows' time grows with the tokens they train, each over
# GPT-2's 50k vocabulary.
RECORDS_PER_TASK = 3
SEQ_LENGTH = 512


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The first records of every example task, one directory per task."""
    root = tmp_path_factory.mktemp("bench_data")
    for task in EXAMPLE_TASKS:
        lines = (EXAMPLE_DATA / task / "train.jsonl").read_text().splitlines()[:RECORDS_PER_TASK]
        (root / task).mkdir()
        (root / task / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def expected(small_data, tokenizer) -> dict:
    """What the data says, counted here: training samples, their tokens, the packed rows."""
    config = DataConfig(data_paths=[f"{small_data}/{t}" for t in EXAMPLE_TASKS], seq_length=SEQ_LENGTH,
                        data_split="98,2", dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)
    rows, _ = pack_dataset(data.train, SEQ_LENGTH, seed=config.split_seed)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert len(lengths) % 2 == 0, "the test needs an even number of training samples"
    return {"samples": len(lengths), "tokens": sum(lengths), "rows": len(rows)}


@pytest.fixture(scope="module")
def run(small_data, expected, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_out")
    # Two optimizer steps make one epoch: half the rows, or half the conversations, per step.
    rows_per_step = math.ceil(expected["rows"] / 2)
    conversations = expected["samples"] // 2
    micro_batch = next(m for m in (3, 2, 1) if conversations % m == 0 and m < conversations)
    command = [
        sys.executable, "scripts/benchmarks/benchmark.py", "--model", "tiny", "--data", small_data, "--tokenizer",
        str(TOKENIZER_DIR), "--seq_length", str(SEQ_LENGTH), "--rows", str(rows_per_step), "--conversations",
        str(conversations), "--pad_micro_batch", str(micro_batch), "--warmup", "1", "--steps", "1",
        "--backends", "sdpa", "--cpu_threads", "1",
        "--only", "mft pack sdpa,mft padding sdpa plain,mft padding_free_samples sdpa plain,"
                  "mft padding_free sdpa plain,trl,prep",
        "--out", str(out / "results.json"), "--table", str(out / "table.md"), "--plot", str(out / "chart.png"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        "results": json.loads((out / "results.json").read_text()),
        "table": (out / "table.md").read_text(),
        "chart": (out / "chart.png").read_bytes(),
        "micro_batch": micro_batch,
        "rows_per_step": rows_per_step,
    }


def by_name(run: dict) -> dict[str, dict]:
    return {r["name"]: r for r in run["results"]["rows"]}


def test_every_row_ran_or_says_why(run):
    rows = by_name(run)
    wanted = ["mft pack sdpa plain", "mft pack sdpa plain coba", "mft padding sdpa plain",
              "mft padding_free_samples sdpa plain", "mft padding_free sdpa plain", "trl rows sdpa fused",
              "trl bfd sdpa fused", "prep mft", "prep trl", "mft pack sdpa chunked"]
    assert sorted(rows) == sorted(wanted)
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row.get('error')}\n{row.get('traceback')}"
        if row["kind"] == "train":
            assert math.isfinite(row["real_tokens_per_s"]) and row["real_tokens_per_s"] > 0, name
            assert math.isfinite(row["final_loss"]), name
            assert row["steps"] == 1 and len(row["real_tokens_by_step"]) == 2, name
            assert row["peak_gb"] is None and "mfu" not in row  # GPU-only figures are not made up on a CPU


def test_the_tokens_group_trains_the_same_tokens_and_the_whole_data(run, expected):
    rows = by_name(run)
    pack = rows["mft pack sdpa plain"]
    # One epoch of the packed rows: every real token of the data, each step within its capacity.
    assert sum(pack["real_tokens_by_step"]) == expected["tokens"]
    assert all(0 < n <= run["rows_per_step"] * SEQ_LENGTH for n in pack["real_tokens_by_step"])
    assert pack["dataset_rows"] == expected["rows"]
    same_steps = ["mft padding_free sdpa plain", "trl rows sdpa fused", "mft pack sdpa plain coba",
                  "mft pack sdpa chunked"]
    for name in same_steps:
        assert rows[name]["real_tokens_by_step"] == pack["real_tokens_by_step"], name
    # TRL gets the same rows and the same loss mask: it trains on exactly our trained tokens.
    assert rows["trl rows sdpa fused"]["trained_tokens_per_step"] == pack["trained_tokens_per_step"]
    # padding_free joins the rows: no padding at all; pack pads each batch to its longest row.
    assert rows["mft padding_free sdpa plain"]["padded_tokens_per_step"] == pack["real_tokens_per_step"]
    assert pack["padded_tokens_per_step"] >= pack["real_tokens_per_step"]
    # TRL packing the same samples itself (best-fit decreasing too) covers them in the same epoch.
    trl_bfd = rows["trl bfd sdpa fused"]
    assert sum(trl_bfd["real_tokens_by_step"]) == expected["tokens"]
    assert trl_bfd["dataset_rows"] <= 2 * run["rows_per_step"]


def test_the_conversations_group_trains_the_same_conversations(run, expected):
    rows = by_name(run)
    padded, flat = rows["mft padding sdpa plain"], rows["mft padding_free_samples sdpa plain"]
    assert padded["real_tokens_by_step"] == flat["real_tokens_by_step"]
    assert sum(padded["real_tokens_by_step"]) == expected["tokens"]  # half the conversations per step: one epoch
    assert flat["padded_tokens_per_step"] == flat["real_tokens_per_step"]
    assert padded["padded_tokens_per_step"] > padded["real_tokens_per_step"]  # padded to each micro-batch's longest
    assert f"{run['micro_batch']}, each padded to its longest" in padded["step"]


def test_data_preparation_rows_agree_on_the_data(run):
    rows = by_name(run)
    ours, theirs = rows["prep mft"], rows["prep trl"]
    assert ours["seconds"] > 0 and theirs["seconds"] > 0
    assert ours["conversations"] == theirs["conversations"] == RECORDS_PER_TASK * len(EXAMPLE_TASKS)
    # TRL, given our chat template with generation markers, tokenizes and masks as our renderer does.
    assert ours["tokens"] == theirs["tokens"] and ours["trained_tokens"] == theirs["trained_tokens"]


def test_table_chart_and_results_are_written(run):
    table = run["table"]
    for name in by_name(run):
        assert f"| {name} |" in table
    assert "MFTTrainer's best row" in table and "CoBa:" in table and "| data preparation |" in table
    assert run["chart"].startswith(b"\x89PNG")
    results = run["results"]
    assert results["environment"]["device_type"] == "cpu" and results["environment"]["trl"]
    assert results["settings"]["model"] == "tiny" and results["data"]["samples"] > 0


def test_the_model_may_be_a_checkpoint_or_a_config_only_directory(tmp_path, monkeypatch):
    """`--model <path>`: a checkpoint's own weights, or random weights of a config.json's shape."""
    from types import SimpleNamespace

    import torch

    from .helpers import tiny_llama

    # The benchmark's modules import each other by name, from their folder (sys.path[0] when it runs).
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "benchmarks"))
    import benchmark_rows as benchmark
    saved = tiny_llama(64)
    saved.save_pretrained(tmp_path / "checkpoint")
    saved.config.save_pretrained(tmp_path / "shape")
    assert benchmark.has_weights(str(tmp_path / "checkpoint")) and not benchmark.has_weights(str(tmp_path / "shape"))
    cpu = torch.device("cpu")
    loaded = benchmark.build_model(SimpleNamespace(model=str(tmp_path / "checkpoint"), seed=0), 64, "sdpa", cpu)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    shaped = benchmark.build_model(SimpleNamespace(model=str(tmp_path / "shape"), seed=1), 64, "sdpa", cpu)
    assert shaped.config.num_hidden_layers == saved.config.num_hidden_layers
    assert not torch.equal(shaped.lm_head.weight, saved.lm_head.weight)
    assert shaped.config._attn_implementation == "sdpa"
