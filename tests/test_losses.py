"""Tests for mft_trainer.losses: per-token CE, loss modes, and exactness across micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from mft_trainer.modes import LossMode
from mft_trainer.losses import (
    LossNormalizers,
    combine_task_sums,
    count_normalizers,
    per_token_cross_entropy,
    reduce_loss,
    task_loss_sums,
    trained_mask,
)

ALL_MODES = list(LossMode)
NUM_TASKS = 3
WEIGHTS = torch.tensor([1.0, 2.5, 0.5])


# ---------------------------------------------------------------- batch building and reference


def build_batch(rows: list[list[tuple[int, int, int]]], length: int, vocab: int = 11, seed: int = 0):
    """Lay out samples ``(task, prompt_len, answer_len)`` in rows (several per row = packed).

    Returns a dict with labels/task_ids/segment_ids as the collator would, plus ``sample_ids``:
    a global sample index per token (-1 on padding) that the reference uses, and that lets a
    micro-batch renumber its segment ids.
    """
    gen = torch.Generator().manual_seed(seed)
    B = len(rows)
    labels = torch.full((B, length), -100, dtype=torch.long)
    task_ids = torch.full((B, length), -1, dtype=torch.long)
    sample_ids = torch.full((B, length), -1, dtype=torch.long)
    sid = 0
    for b, row in enumerate(rows):
        pos = 0
        for task, prompt_len, answer_len in row:
            n = prompt_len + answer_len
            assert pos + n <= length
            labels[b, pos + prompt_len : pos + n] = torch.randint(0, vocab, (answer_len,), generator=gen)
            task_ids[b, pos : pos + n] = task
            sample_ids[b, pos : pos + n] = sid
            pos, sid = pos + n, sid + 1
    batch = {"labels": labels, "task_ids": task_ids, "sample_ids": sample_ids}
    batch["segment_ids"] = renumber(sample_ids)
    return batch


def renumber(sample_ids: torch.Tensor) -> torch.Tensor:
    """Segment ids 0..S-1 local to a micro-batch, -1 on padding."""
    present = torch.unique(sample_ids[sample_ids >= 0])  # sorted
    seg = torch.searchsorted(present, sample_ids.clamp(min=0))
    return torch.where(sample_ids >= 0, seg, -1)


def micro_batches(batch: dict, splits: list[list[int]]) -> list[dict]:
    """Slice rows into micro-batches, renumbering segment ids per micro-batch."""
    out = []
    for rows in splits:
        mb = {k: v[rows] for k, v in batch.items()}
        mb["segment_ids"] = renumber(mb["sample_ids"])
        out.append(mb)
    return out


def reference_loss(per_token_loss, batch, mode: LossMode, weights=None) -> float:
    """The DESIGN.md formulas over the whole batch, with plain Python loops."""
    loss, labels = per_token_loss.tolist(), batch["labels"].tolist()
    tasks, sids = batch["task_ids"].tolist(), batch["sample_ids"].tolist()
    samples: dict[int, list[float]] = {}  # sample id -> losses of its trained tokens
    sample_task: dict[int, int] = {}
    for b in range(len(labels)):
        for j in range(1, len(labels[b])):  # column 0 is never a target
            if labels[b][j] != -100:
                samples.setdefault(sids[b][j], []).append(loss[b][j])
                sample_task[sids[b][j]] = tasks[b][j]
    if not samples:
        return 0.0
    means = {s: sum(v) / len(v) for s, v in samples.items()}
    if mode is LossMode.CASE1:
        return sum(sum(v) for v in samples.values()) / sum(len(v) for v in samples.values())
    if mode is LossMode.CASE2:
        return sum(means.values()) / len(means)
    w = [1.0] * NUM_TASKS if weights is None else [float(x) for x in weights]
    total, wsum = 0.0, 0.0
    for t in sorted(set(sample_task.values())):  # tasks present in the step only
        mine = [s for s in samples if sample_task[s] == t]
        if mode is LossMode.CASE4:
            term = sum(means[s] for s in mine) / len(mine)
        else:  # case3 / coba: token mean of the task
            term = sum(sum(samples[s]) for s in mine) / sum(len(samples[s]) for s in mine)
        total, wsum = total + w[t] * term, wsum + w[t]
    return total / wsum


# 8 samples over 6 rows: packed rows mixing tasks, task 0 with 4 samples, task 1 with 2, task 2
# with 1 trained sample plus one sample whose answer was truncated away (no trained token).
SAMPLES_ROWS = [
    [(0, 3, 5), (1, 2, 9)],
    [(0, 4, 2)],
    [(2, 1, 6)],
    [(0, 2, 3), (1, 3, 1)],
    [(2, 5, 0)],
    [(0, 1, 7)],
]
SPLITS = [
    [[0, 1, 2, 3, 4, 5]],
    [[0, 1, 2], [3, 4, 5]],
    [[0], [1], [2], [3], [4], [5]],  # single-task micro-batches; [4] has no trained token
    [[0, 5], [1, 4], [2, 3]],
    [[4], [0, 1, 2, 3, 5]],
]


def full_batch(seed: int = 0) -> dict:
    return build_batch(SAMPLES_ROWS, length=20, seed=seed)


def local_batch(batch: dict) -> dict:
    return {k: batch[k] for k in ("labels", "task_ids", "segment_ids")}


# ---------------------------------------------------------------- per-token CE and mask


def test_trained_mask_ignores_column_zero_without_mutating_labels():
    labels = torch.tensor([[5, -100, 3, 4], [7, 2, -100, -100]])
    before = labels.clone()
    mask = trained_mask(labels)
    assert mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert torch.equal(labels, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_cross_entropy_matches_naive_loop(dtype):
    gen = torch.Generator().manual_seed(1)
    B, L, V = 3, 6, 7
    logits = torch.randn(B, L, V, generator=gen).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, 2] = labels[1, 4] = labels[2, 1] = -100  # column 0 stays labelled: must be ignored
    out = per_token_cross_entropy(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (B, L)
    expected = torch.zeros(B, L)
    for b in range(B):
        for j in range(1, L):
            if labels[b, j] != -100:
                expected[b, j] = -torch.log_softmax(logits[b, j - 1].float(), dim=-1)[labels[b, j]]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- modes against references


def test_modes_on_hand_computed_numbers():
    # Row 0: sample A (task 0) losses [1, 3]; row 1: sample B (task 0) [4] packed with C (task 1) [6].
    labels = torch.tensor([[-100, 1, 1, -100], [-100, 1, -100, 1]])
    task_ids = torch.tensor([[0, 0, 0, -1], [0, 0, 1, 1]])
    segment_ids = torch.tensor([[0, 0, 0, -1], [1, 1, 2, 2]])
    loss = torch.tensor([[9.0, 1.0, 3.0, 9.0], [9.0, 4.0, 9.0, 6.0]])  # 9s are never trained
    batch = {"labels": labels, "task_ids": task_ids, "segment_ids": segment_ids}
    norms = count_normalizers([batch], num_tasks=2)
    assert norms.tokens_per_task.tolist() == [3.0, 1.0]
    assert norms.samples_per_task.tolist() == [2.0, 1.0]
    w = torch.tensor([1.0, 2.0])
    expected = {  # token mean, sample mean, task token means (8/3, 6), task sample means (3, 6)
        LossMode.CASE1: 14 / 4,
        LossMode.CASE2: (2 + 4 + 6) / 3,
        LossMode.CASE3: (8 / 3 + 2 * 6) / 3,
        LossMode.CASE4: (3 + 2 * 6) / 3,
        LossMode.COBA: (8 / 3 + 2 * 6) / 3,
    }
    for mode, value in expected.items():
        got = reduce_loss(loss, labels, task_ids, segment_ids, mode, norms, task_weights=w)
        assert got.item() == pytest.approx(value, rel=1e-6), mode


@pytest.mark.parametrize("mode", ALL_MODES)
def test_each_mode_matches_reference(mode):
    batch = full_batch()
    gen = torch.Generator().manual_seed(2)
    loss = torch.rand(batch["labels"].shape, generator=gen, dtype=torch.float64) * 5
    norms = count_normalizers([batch], NUM_TASKS)
    got = reduce_loss(loss, **local_batch(batch), mode=mode, normalizers=norms, task_weights=WEIGHTS)
    assert got.item() == pytest.approx(reference_loss(loss, batch, mode, WEIGHTS), rel=1e-12)


def test_count_normalizers_by_segment_not_row():
    norms = count_normalizers([full_batch()], NUM_TASKS)
    assert norms.tokens_per_task.dtype == torch.float32
    assert norms.tokens_per_task.tolist() == [5 + 2 + 3 + 7, 9 + 1, 6]
    # Task 2's second sample has no trained token, so it is not a sample of the step.
    assert norms.samples_per_task.tolist() == [4, 2, 1]


def test_normalizers_summed_over_ranks_equal_global_counts():
    batch = full_batch()
    rank0, rank1 = micro_batches(batch, [[0, 1], [2]]), micro_batches(batch, [[3, 4], [5]])
    summed = count_normalizers(rank0, NUM_TASKS).stacked() + count_normalizers(rank1, NUM_TASKS).stacked()
    assert summed.shape == (2, NUM_TASKS)
    merged = LossNormalizers.from_stacked(summed)  # what the caller does after an all-reduce
    whole = count_normalizers([batch], NUM_TASKS)
    assert torch.equal(merged.tokens_per_task, whole.tokens_per_task)
    assert torch.equal(merged.samples_per_task, whole.samples_per_task)


# ---------------------------------------------------------------- exactness across micro-batches


def _step(batch: dict, splits: list[list[int]], logits_full: torch.Tensor, mode: LossMode):
    """Run one 'optimizer step' over micro-batches; return the summed loss and d loss / d logits."""
    logits = logits_full.detach().clone().requires_grad_(True)
    mbs = micro_batches(batch, splits)
    norms = count_normalizers(mbs, NUM_TASKS)  # over the whole accumulation window
    total = torch.zeros(())
    for rows, mb in zip(splits, mbs):
        per_token = per_token_cross_entropy(logits[rows], mb["labels"])
        part = reduce_loss(per_token, **local_batch(mb), mode=mode, normalizers=norms, task_weights=WEIGHTS)
        part.backward()  # one backward per micro-batch, as under gradient accumulation
        total = total + part.detach()
    return total, logits.grad


@pytest.mark.parametrize("mode", ALL_MODES)
def test_split_invariance_of_loss_and_gradient(mode):
    batch = full_batch()
    logits = torch.randn(*batch["labels"].shape, 11, generator=torch.Generator().manual_seed(3))
    ref_loss, ref_grad = _step(batch, SPLITS[0], logits, mode)
    per_token = per_token_cross_entropy(logits, batch["labels"])
    assert ref_loss.item() == pytest.approx(reference_loss(per_token, batch, mode, WEIGHTS), rel=1e-6)
    assert ref_grad.abs().sum() > 0
    for splits in SPLITS[1:]:
        loss, grad = _step(batch, splits, logits, mode)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6), splits
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{splits}: {m}")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_packed_row_reduces_like_separate_rows(mode):
    # Samples of different tasks and lengths, so a per-row mean would differ from a per-sample one.
    packed = build_batch([[(0, 2, 6), (1, 1, 2)], [(2, 2, 3)]], length=12, seed=4)
    separate = build_batch([[(0, 2, 6)], [(1, 1, 2)], [(2, 2, 3)]], length=12, seed=4)
    assert torch.equal(packed["labels"][packed["labels"] != -100], separate["labels"][separate["labels"] != -100])
    # Give each trained token the same loss in both layouts (same order of trained tokens).
    values = torch.arange(1.0, 12.0, dtype=torch.float64) ** 1.5
    results = []
    for batch in (packed, separate):
        loss = torch.zeros(batch["labels"].shape, dtype=torch.float64)
        loss[batch["labels"] != -100] = values
        norms = count_normalizers([batch], NUM_TASKS)
        results.append(reduce_loss(loss, **local_batch(batch), mode=mode, normalizers=norms, task_weights=WEIGHTS))
        assert norms.samples_per_task.tolist() == [1, 1, 1]
    assert results[0].item() == pytest.approx(results[1].item(), rel=1e-12)
    assert results[0].item() == pytest.approx(reference_loss(loss, separate, mode, WEIGHTS), rel=1e-12)


# ---------------------------------------------------------------- absent tasks, empty steps


@pytest.mark.parametrize("mode", [LossMode.CASE3, LossMode.CASE4, LossMode.COBA])
def test_task_absent_from_step_is_left_out_of_weights(mode):
    # Task 1 is absent; its large weight must not enter W. Task 0: samples [1, 3] and [5];
    # task 2: sample [2].
    labels = torch.tensor([[-100, 1, 1, -100, 1], [-100, 1, -100, -100, -100]])
    task_ids = torch.tensor([[0, 0, 0, 0, 0], [2, 2, -1, -1, -1]])
    segment_ids = torch.tensor([[0, 0, 0, 1, 1], [2, 2, -1, -1, -1]])
    loss = torch.tensor([[0.0, 1.0, 3.0, 0.0, 5.0], [0.0, 2.0, 0.0, 0.0, 0.0]], requires_grad=True)
    batch = {"labels": labels, "task_ids": task_ids, "segment_ids": segment_ids}
    norms = count_normalizers([batch], NUM_TASKS)
    assert norms.tokens_per_task[1] == 0 and norms.samples_per_task[1] == 0
    w = torch.tensor([1.0, 100.0, 3.0])
    got = reduce_loss(loss, labels, task_ids, segment_ids, mode, norms, task_weights=w)
    task0 = (1 + 3 + 5) / 3 if mode is not LossMode.CASE4 else ((1 + 3) / 2 + 5) / 2
    assert torch.isfinite(got)
    assert got.item() == pytest.approx((1 * task0 + 3 * 2.0) / (1 + 3), rel=1e-6)
    got.backward()
    assert torch.isfinite(loss.grad).all()


@pytest.mark.parametrize("mode", [LossMode.CASE3, LossMode.CASE4, LossMode.COBA])
def test_fractional_weights_of_present_tasks_are_renormalised(mode):
    # CoBa-style weights below 1: with only task 2 present, the loss is task 2's mean, whatever w_2.
    batch = build_batch([[(2, 1, 3)], [(2, 2, 2)]], length=6, seed=7)
    loss = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    norms = count_normalizers([batch], NUM_TASKS)
    w = torch.tensor([0.5, 0.3, 0.2])
    got = reduce_loss(loss, **local_batch(batch), mode=mode, normalizers=norms, task_weights=w)
    assert got.item() == pytest.approx(reference_loss(loss, batch, mode, w), rel=1e-12)
    single_task = LossMode.CASE2 if mode is LossMode.CASE4 else LossMode.CASE1  # one task: plain mean
    assert got.item() == pytest.approx(reference_loss(loss, batch, single_task), rel=1e-12)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_step_without_trained_tokens_gives_differentiable_zero(mode):
    batch = build_batch([[(0, 3, 0)], [(1, 4, 0), (2, 2, 0)]], length=8)
    loss = torch.rand(batch["labels"].shape, requires_grad=True)
    norms = count_normalizers([batch], NUM_TASKS)
    assert norms.stacked().sum() == 0
    got = reduce_loss(loss, **local_batch(batch), mode=mode, normalizers=norms, task_weights=WEIGHTS)
    assert got.item() == 0.0 and got.grad_fn is not None
    got.backward()
    assert torch.equal(loss.grad, torch.zeros_like(loss))


def test_task_loss_sums_are_per_task_token_and_sample_mean_sums():
    batch = full_batch()
    loss = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(5), requires_grad=True)
    sums = task_loss_sums(loss, batch["labels"], batch["task_ids"], batch["segment_ids"], NUM_TASKS)
    exp_tokens = [0.0] * NUM_TASKS
    per_sample: dict[int, list[float]] = {}
    sample_task: dict[int, int] = {}
    for b in range(loss.shape[0]):
        for j in range(1, loss.shape[1]):
            if batch["labels"][b, j] != -100:
                t, s = int(batch["task_ids"][b, j]), int(batch["segment_ids"][b, j])
                exp_tokens[t] += float(loss[b, j])
                per_sample.setdefault(s, []).append(float(loss[b, j]))
                sample_task[s] = t
    exp_means = [0.0] * NUM_TASKS
    for s, values in per_sample.items():
        exp_means[sample_task[s]] += sum(values) / len(values)
    assert sums[0].tolist() == pytest.approx(exp_tokens, rel=1e-6)
    assert sums[1].tolist() == pytest.approx(exp_means, rel=1e-6)
    assert sums.requires_grad


def test_combined_sums_of_a_whole_set_equal_the_loss_of_one_batch():
    """Evaluation accumulates detached sums and counts batch by batch; combining them at the end
    gives the loss of the whole set as one batch, for every mode."""
    batch = full_batch()
    loss = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(9))
    for mode in ("case1", "case2", "case3", "case4"):
        whole = reduce_loss(loss, **local_batch(batch), mode=mode, normalizers=count_normalizers([batch], NUM_TASKS),
                            task_weights=WEIGHTS)
        sums, counts = torch.zeros(2, NUM_TASKS), torch.zeros(2, NUM_TASKS)
        splits = [[0, 1], [2], [3, 4, 5]]
        for rows, micro in zip(splits, micro_batches(batch, splits)):
            sums += task_loss_sums(loss[rows], micro["labels"], micro["task_ids"], micro["segment_ids"], NUM_TASKS)
            counts += count_normalizers([micro], NUM_TASKS).stacked()
        combined = combine_task_sums(sums, mode, LossNormalizers.from_stacked(counts), WEIGHTS)
        assert combined.item() == pytest.approx(whole.item(), rel=1e-6)


# ---------------------------------------------------------------- LossMode.parse


@pytest.mark.parametrize(
    "value, expected",
    [
        ("case1", LossMode.CASE1), ("CASE2", LossMode.CASE2), ("case3", LossMode.CASE3),
        ("case4", LossMode.CASE4), ("CoBa", LossMode.COBA), ("token", LossMode.CASE1),
        ("Sample", LossMode.CASE2), ("TASK", LossMode.CASE3), ("task_sample", LossMode.CASE4),
        (LossMode.CASE4, LossMode.CASE4),
    ],
)
def test_loss_mode_parse_accepts_names_and_aliases(value, expected):
    assert LossMode.parse(value) is expected


def test_loss_mode_parse_rejects_unknown_value_listing_accepted_ones():
    with pytest.raises(ValueError) as err:
        LossMode.parse("case5")
    message = str(err.value)
    assert "case5" in message
    for accepted in ("case1", "case3", "coba", "token", "task_sample"):
        assert accepted in message


def test_reduce_loss_accepts_mode_string():
    batch = full_batch()
    loss = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(6))
    norms = count_normalizers([batch], NUM_TASKS)
    by_alias = reduce_loss(loss, **local_batch(batch), mode="task", normalizers=norms)
    by_enum = reduce_loss(loss, **local_batch(batch), mode=LossMode.CASE3, normalizers=norms)
    assert math.isclose(by_alias.item(), by_enum.item(), rel_tol=0, abs_tol=0)
