"""The task mixture: exact samples per epoch for each rule, seeded and deterministic plans (an
up-sampled task repeats only after all its samples were used), max_samples, the summary's counts,
packing of the plan, and resuming mid-epoch under uniform sampling as the uninterrupted run."""

from collections import Counter

import numpy as np
import pytest
import torch

from mft_trainer import DataConfig, MFTConfig, MFTTrainer, build_mft_dataset
from mft_trainer.mixture import SamplingRule, epoch_indices, samples_per_epoch, subset_indices

from .helpers import chat, tiny_llama, write_jsonl

SIZES = {"small": 4, "medium": 12, "large": 32}  # 48 samples in all


@pytest.fixture
def task_dirs(tmp_path):
    """Three tasks of 4, 12 and 32 records, each record's answer naming its task and index."""
    paths = []
    for name, size in SIZES.items():
        rows = [chat(("human", f"{name} question {i}"), ("bot", f"{name} answer {i}")) for i in range(size)]
        paths.append(str(write_jsonl(tmp_path / name / "train.jsonl", rows).parent))
    return paths


def build(paths, tokenizer, **kwargs):
    kwargs.setdefault("dataset_cache_dir", "none")
    kwargs.setdefault("data_split", "100,0")
    return build_mft_dataset(DataConfig(data_paths=paths, **kwargs), tokenizer)


def per_task(data) -> Counter:
    return Counter(data.tasks.name_of(t) for t in data.train["task_id"])


@pytest.mark.parametrize("sampling,expected", [
    ("proportional", {"small": 4, "medium": 12, "large": 32}),
    ("uniform", {"small": 16, "medium": 16, "large": 16}),
    # sqrt(4), sqrt(12), sqrt(32) = 2, 3.46, 5.66 of 11.12: 8.63, 14.95, 24.42 of 48 -> 8, 14, 24, and the two
    # samples left go to the largest remainders (.95, .63)
    ({"temperature": 2}, {"small": 9, "medium": 15, "large": 24}),
    ({"weights": {"small": 1, "large": 2}}, {"small": 12, "medium": 12, "large": 24}),  # medium weighs 1
    ({"weights": {"small": 0, "medium": 1, "large": 1}}, {"medium": 24, "large": 24}),
])
def test_each_rule_gives_exact_samples_per_epoch(task_dirs, tokenizer, sampling, expected):
    data = build(task_dirs, tokenizer, task_sampling=sampling)
    assert dict(per_task(data)) == expected
    assert {t.name: t.samples_per_epoch for t in data.summary.tasks} == {n: expected.get(n, 0) for n in SIZES}
    assert {t.name: t.train_samples for t in data.summary.tasks} == SIZES  # the samples available


def test_temperature_counts_follow_the_formula():
    sizes = [4, 12, 32]
    shares = np.array(sizes) ** 0.5 / sum(np.array(sizes) ** 0.5)
    exact = shares * sum(sizes)  # 8.63, 14.95, 24.42
    assert np.allclose(exact, [8.63, 14.95, 24.42], atol=0.01)
    assert samples_per_epoch(SamplingRule.parse({"temperature": 2}), list(SIZES), sizes) == [9, 15, 24]
    assert samples_per_epoch(SamplingRule.parse({"temperature": 1}), list(SIZES), sizes) == sizes
    assert samples_per_epoch(SamplingRule.parse({"temperature": 1e6}), list(SIZES), sizes) == [16, 16, 16]


def test_upsampled_tasks_repeat_only_after_all_samples_and_downsampled_ones_never(task_dirs, tokenizer):
    data = build(task_dirs, tokenizer, task_sampling="uniform")
    answers = Counter(tokenizer.decode(r["input_ids"]).split("<s>bot\n")[1] for r in data.train)
    small = [answers[f"small answer {i}\n<|endoftext|>\n"] for i in range(4)]
    medium = [answers[f"medium answer {i}\n<|endoftext|>\n"] for i in range(12)]
    large = [answers[f"large answer {i}\n<|endoftext|>\n"] for i in range(32)]
    assert small == [4, 4, 4, 4]  # 16 draws of 4 samples: each exactly 4 times
    assert sorted(medium) == [1] * 8 + [2] * 4  # 16 of 12: all once, then 4 of them again
    assert sorted(large) == [0] * 16 + [1] * 16  # 16 of 32: a subset, no repeats


def test_the_plan_is_deterministic_by_seed_and_independent_of_other_tasks():
    first = epoch_indices(12, 30, seed=1, task="medium")
    assert np.array_equal(first, epoch_indices(12, 30, seed=1, task="medium"))
    assert not np.array_equal(first, epoch_indices(12, 30, seed=2, task="medium"))
    assert not np.array_equal(first, epoch_indices(12, 30, seed=1, task="other"))
    for start in (0, 12):  # each pass of 12 is a permutation
        assert sorted(first[start:start + 12].tolist()) == list(range(12))
    assert sorted(first[24:].tolist()) == sorted(set(first[24:].tolist()))  # the last, partial pass has no repeat


def test_plans_are_the_same_in_two_builds_and_change_with_the_seed(task_dirs, tokenizer):
    def rows(seed):
        return build(task_dirs, tokenizer, task_sampling="uniform", split_seed=seed).train.to_list()

    assert rows(3) == rows(3)
    assert rows(3) != rows(4)


def test_max_samples_takes_a_seeded_subset_before_the_split(task_dirs, tokenizer):
    data = build(task_dirs, tokenizer, max_samples={"large": 10}, data_split="80,20")
    large = data.summary.task("large")
    assert (large.records, large.over_max_samples, large.samples) == (32, 22, 10)
    assert (large.train_samples, large.valid_samples) == (8, 2)
    assert data.summary.task("medium").samples == 12
    capped = build(task_dirs, tokenizer, max_samples=5)
    assert [t.samples for t in capped.summary.tasks] == [4, 5, 5]
    assert np.array_equal(subset_indices(32, 10, 42, "large"), subset_indices(32, 10, 42, "large"))
    with pytest.raises(ValueError, match=r"max_samples names unknown task\(s\) \['huge'\]"):
        build(task_dirs, tokenizer, max_samples={"huge": 1})


def test_summary_shows_available_per_epoch_and_trained_token_shares(task_dirs, tokenizer):
    data = build(task_dirs, tokenizer, task_sampling="uniform")
    trained = Counter()
    for row in data.train:
        trained[data.tasks.name_of(row["task_id"])] += sum(label != -100 for label in row["labels"])
    total = sum(trained.values())
    for task in data.summary.tasks:
        assert task.epoch_trained_tokens == trained[task.name]
        assert task.trained_token_share == pytest.approx(trained[task.name] / total)
    text = str(data.summary)
    assert "task mixture (uniform): 48 training samples per epoch" in text
    lines = text.splitlines()
    start = lines.index("task mixture (uniform): 48 training samples per epoch")
    assert lines[start + 1].split() == ["task", "available", "per", "epoch", "trained-token", "share"]
    small = data.summary.task("small")
    assert lines[start + 2].split() == ["small", "4", "16", f"{100 * small.trained_token_share:.1f}%"]


@pytest.mark.parametrize("padding_mode", ["pack", "padding_free"])
def test_packing_lays_out_the_planned_samples(task_dirs, tokenizer, padding_mode):
    data = build(task_dirs, tokenizer, task_sampling="uniform", padding_mode=padding_mode, seq_length=256)
    if padding_mode == "pack":
        starts = Counter()
        for row in data.train:
            for position, task_id in zip(row["position_ids"], row["task_ids"]):
                if position == 0:
                    starts[data.tasks.name_of(task_id)] += 1
        assert dict(starts) == {"small": 16, "medium": 16, "large": 16}
    else:
        assert dict(per_task(data)) == {"small": 16, "medium": 16, "large": 16}


@pytest.mark.parametrize("value,message", [
    ("random", "is not a sampling rule"),
    ("temperature", "needs its value"),
    ({"temperature": 0}, "must be a number > 0"),
    ({"weights": {"a": -1}}, ">= 0"),
    ({"weights": {"a": 0}}, "at least one weight"),
    ({"temperature": 2, "weights": {}}, "is not a sampling rule"),
])
def test_bad_sampling_rules_are_errors(value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(data_paths="x", task_sampling=value)


def test_sampling_weights_must_name_tasks(task_dirs, tokenizer):
    with pytest.raises(ValueError, match=r"task_sampling weights name unknown task\(s\) \['tiny'\]"):
        build(task_dirs, tokenizer, task_sampling={"weights": {"tiny": 2}})


def train_steps(data, output_dir, max_steps, resume_from=None):
    model = tiny_llama(50257, seed=0)
    args = MFTConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=2,
                     save_steps=3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=7)
    trainer = MFTTrainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator(pad_token_id=0),
                         tasks=data.tasks)
    trainer.train(resume_from_checkpoint=resume_from)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    per_task_losses = {(h["step"], k): v for h in trainer.state.log_history for k, v in h.items() if k.startswith("loss/")}
    return losses, per_task_losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_resuming_mid_epoch_with_uniform_sampling_trains_as_the_uninterrupted_run(task_dirs, tokenizer, tmp_path):
    """6 steps of 4 samples, a checkpoint at step 3, in an epoch of 48 (up- and down-sampled) samples:
    the resumed run gives the uninterrupted run's losses, per-task losses and weights."""
    def data():  # built anew for each run, as a resumed process would
        return build(task_dirs, tokenizer, task_sampling="uniform", dataset_cache_dir=str(tmp_path / "cache"))

    full_losses, full_tasks, full_params = train_steps(data(), tmp_path / "full", max_steps=6)
    train_steps(data(), tmp_path / "interrupted", max_steps=6)  # writes checkpoint-3 on the way
    resumed_losses, resumed_tasks, resumed_params = train_steps(
        data(), tmp_path / "resumed", 6, resume_from=str(tmp_path / "interrupted" / "checkpoint-3"))
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6), step
    later = {key: value for key, value in full_tasks.items() if key[0] > 3}
    assert later and {key: resumed_tasks[key] for key in later} == pytest.approx(later, rel=1e-6)
    for name in full_params:
        torch.testing.assert_close(resumed_params[name], full_params[name], rtol=1e-5, atol=1e-7)
