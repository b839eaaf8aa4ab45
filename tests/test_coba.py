"""CoBa (`weighted_loss_mode: coba`): the weights against an independent implementation of the
equations and against MFTCoder's numbers, their behaviour on hand-built histories, the balancer's
state, and the trainer integration (logging, loss, resume, two ranks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.coba import CoBaBalancer, fit_slope, floor_weights
from mft_trainer.coba_validation import ValidationStream
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.losses import count_normalizers, per_token_cross_entropy, reduce_loss

from .conftest import REPO
from .distributed.coba_run import TASKS, coba_trainer, task_samples
from .helpers import tiny_llama
from .test_trainer import free_port

# ---- An independent implementation of the equations (issue 6), in numpy ---------------------------


def reference_weights(history: np.ndarray, warmup: int, window: int, tau: float, interval: int = 1) -> dict:
    """The CoBa weights after each update step, from the normalised validation losses h[k, s] recorded
    after optimizer steps interval, 2 * interval, ... (column s is step (s + 1) * interval).

    Windows as in MFTCoder: a_i is the least-squares slope of the last `window` samples; the ACS
    window holds the slope entries of index >= (step // interval) - window; DF uses every max-slope.
    """
    K, num_samples = history.shape
    slopes, max_slopes, weights = [], [], {}
    for s in range(num_samples):
        step = (s + 1) * interval
        if step < warmup:
            continue
        h = history[:, max(0, s + 1 - window): s + 1]  # [K, N]
        x = np.arange(h.shape[1], dtype=np.float64)
        a = np.array([np.polyfit(x, h[k], 1)[0] for k in range(K)])
        a_max = np.polyfit(x, h.max(axis=0), 1)[0]
        slopes.append(a)
        max_slopes.append(a_max)

        def softmax(z):
            e = np.exp(z - z.max())
            return e / e.sum()

        rcs = softmax(K * a / np.abs(a).sum())
        acs_window = np.array(slopes[min(max(0, step // interval - window), len(slopes) - 1):])  # [N, K]
        acs = softmax(-len(acs_window) * a / np.abs(acs_window).sum(axis=0))
        m = np.array(max_slopes)
        df = len(m) * softmax(-tau * len(m) * m / np.abs(m).sum())[-1]
        w = softmax(K * (df * rcs + (1 - df) * acs))
        if (w < 1 / (10 * K)).any():
            w = w * 0.9 + 1 / (10 * K)
        weights[step] = w
    return weights


def balancer_weights(history: np.ndarray, warmup: int, window: int, tau: float, interval: int = 1) -> dict:
    """The same history fed to CoBaBalancer (L_i(0) = 1, so h is the loss itself)."""
    balancer = CoBaBalancer(history.shape[0], warmup_steps=warmup, history_length=window, tau=tau,
                            update_interval=interval)
    balancer.set_initial_losses(np.ones(history.shape[0]))
    weights = {}
    for s in range(history.shape[1]):
        step = (s + 1) * interval
        assert balancer.should_sample(step) or step + window * interval <= warmup
        balancer.record(step, torch.from_numpy(history[:, s]))
        if step >= warmup:
            weights[step] = balancer.weights.numpy()
    return weights


def curves(*functions, steps: int, interval: int = 1) -> np.ndarray:
    """[K, steps // interval] history with h_k(s) = functions[k](s) at s = interval, 2 * interval, ..."""
    points = range(interval, steps + 1, interval)
    return np.array([[f(s) for s in points] for f in functions], dtype=np.float64)


ISSUE_HISTORY = (lambda s: math.exp(-s / 30), lambda s: 1 - s / 1000, lambda s: math.exp(-s / 100))
OVERFITTING = (lambda s: math.exp(-s / 50), lambda s: math.exp(-s / 80), lambda s: 0.6 + 0.4 * ((s - 90) / 90) ** 2)
# The slowest task's loss (the maximum) drops suddenly at the end: DF shoots up to ~M and the weights
# spread so far apart that the floor applies.
SUDDEN_DROP = (
    lambda s: 1 - s / 5000 if s < 140 else 0.972 - 0.05 * (s - 140),
    lambda s: math.exp(-s / 30),
    lambda s: math.exp(-s / 60),
)


@pytest.mark.parametrize(
    "functions,steps,warmup,window,tau,interval",
    [
        (ISSUE_HISTORY, 150, 100, 200, 5.0, 1),
        (ISSUE_HISTORY, 500, 100, 200, 5.0, 1),  # both windows full and sliding
        (ISSUE_HISTORY, 400, 50, 100, 2.0, 1),
        (OVERFITTING, 300, 60, 80, 5.0, 3),  # update every 3 steps
        (SUDDEN_DROP, 150, 100, 200, 5.0, 1),
    ],
)
def test_weights_equal_an_independent_implementation(functions, steps, warmup, window, tau, interval):
    history = curves(*functions, steps=steps, interval=interval)
    expected = reference_weights(history, warmup, window, tau, interval)
    got = balancer_weights(history, warmup, window, tau, interval)
    assert got.keys() == expected.keys() and len(got) > 10
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=0, atol=1e-9, err_msg=f"step {step}")


# Weights of MFTCoder's CoBaStatus (mftcoder_accelerate/src/utils/loss_utils.py, torch float64) fed with
# the same histories as `balancer_weights`: h = f(s) recorded after steps 1..steps, compute_per_task_weight
# called at completed_steps = steps, warmup 100, history length 200, tau 5.
MFTCODER_WEIGHTS = {
    150: [0.19294855822143273, 0.6197297925658073, 0.1873216492127599],
    500: [0.591182995477375, 0.11568779805398323, 0.2931292064686419],
}


@pytest.mark.parametrize("steps", sorted(MFTCODER_WEIGHTS))
def test_weights_match_mftcoder(steps):
    got = balancer_weights(curves(*ISSUE_HISTORY, steps=steps), warmup=100, window=200, tau=5.0)[steps]
    np.testing.assert_allclose(got, MFTCODER_WEIGHTS[steps], rtol=0, atol=1e-9)
    if steps == 150:  # the figures quoted in issue 6
        np.testing.assert_allclose(got, [0.193, 0.620, 0.187], atol=1e-3)


def test_identical_histories_give_equal_weights():
    history = curves(*[ISSUE_HISTORY[0]] * 3, steps=150)
    for step, weights in balancer_weights(history, warmup=100, window=200, tau=5.0).items():
        np.testing.assert_allclose(weights, [1 / 3] * 3, atol=1e-12, err_msg=f"step {step}")


def test_an_overfitting_task_ends_with_the_lowest_weight():
    weights = balancer_weights(curves(*OVERFITTING, steps=150), warmup=100, window=200, tau=5.0)
    final = weights[150]
    assert final.argmin() == 2 and final[2] < 1 / 3, final
    # While it still fell (its minimum is at step 90, so the window's slope was still negative at the
    # end of warmup) it was not the lowest.
    assert weights[100].argmin() != 2, weights[100]


def test_the_floor_holds():
    weights = balancer_weights(curves(*SUDDEN_DROP, steps=150), warmup=100, window=200, tau=5.0)
    floor = 1 / 30
    for step, w in weights.items():
        assert w.min() >= floor - 1e-12 and w.sum() == pytest.approx(1.0, abs=1e-12), (step, w)
    assert weights[150][0] == pytest.approx(floor, abs=1e-9)  # the floor was applied: the weight sits on it
    # The rule itself: 0.9 * w + 1 / (10K) when any weight is below 1 / (10K), else unchanged.
    w = torch.tensor([0.01, 0.49, 0.5], dtype=torch.float64)
    torch.testing.assert_close(floor_weights(w), w * 0.9 + floor)
    w = torch.tensor([0.04, 0.46, 0.5], dtype=torch.float64)
    torch.testing.assert_close(floor_weights(w), w)


def test_slope_keeps_the_positions_of_missing_points():
    values = torch.tensor([1.0, math.nan, 5.0, 7.0, math.nan, 11.0], dtype=torch.float64)  # 2x + 1
    assert fit_slope(values).item() == pytest.approx(2.0, abs=1e-12)
    assert fit_slope(torch.tensor([math.nan, 3.0, math.nan])).item() == 0.0  # fewer than two points


def test_sampling_schedule():
    balancer = CoBaBalancer(2, warmup_steps=1000, history_length=200, update_interval=2)
    sampled = [step for step in range(1, 1101) if balancer.should_sample(step)]
    # Even steps only, from the first whose sample the update at step 1000 uses (200 samples back).
    assert sampled[0] == 602 and sampled[-1] == 1100 and all(step % 2 == 0 for step in sampled)
    assert sum(1 for step in sampled if step <= 1000) == 200


def test_warmup_weights_are_the_configured_ones():
    balancer = CoBaBalancer(3, initial_weights=[1.0, 2.0, 1.0], warmup_steps=5, history_length=10)
    balancer.set_initial_losses([2.0, 2.0, 2.0])
    for step in range(1, 5):
        balancer.record(step, [2.0 - 0.1 * step, 2.0 - 0.2 * step, 2.0])
        torch.testing.assert_close(balancer.weights, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    balancer.record(5, [1.5, 1.0, 2.0])
    assert balancer.num_updates == 1
    assert not torch.allclose(balancer.weights, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))


def test_state_dict_round_trips_through_json_and_continues_identically():
    history = curves(*OVERFITTING, steps=160)
    history[1, 30] = history[2, 120] = math.nan  # tasks absent from a draw
    first = CoBaBalancer(3, warmup_steps=100, history_length=50, tau=3.0)
    first.set_initial_losses([1.0, 1.0, 1.0])
    for s in range(130):
        first.record(s + 1, history[:, s])
    second = CoBaBalancer(3, warmup_steps=100, history_length=50, tau=3.0)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for s in range(130, 160):
        first.record(s + 1, history[:, s])
        second.record(s + 1, history[:, s])
        assert torch.equal(first.weights, second.weights), s
    with pytest.raises(ValueError, match="same tasks"):
        CoBaBalancer(4).load_state_dict(first.state_dict())


def test_initial_losses_must_exist_for_every_task():
    with pytest.raises(ValueError, match=r"task ids \[1\]"):
        CoBaBalancer(2).set_initial_losses([1.0, math.nan])


def test_validation_stream_cycles_and_shards():
    one = ValidationStream(size=7, batch_size=4, num_ranks=1, rank=0, seed=3)
    ranks = [ValidationStream(size=7, batch_size=2, num_ranks=2, rank=r, seed=3) for r in range(2)]
    walk = [i for k in range(7) for i in one.draw(k)]  # 28 positions: four passes
    for p in range(4):
        assert sorted(walk[7 * p: 7 * p + 7]) == list(range(7))  # every pass visits each row once
    assert walk[:7] != walk[7:14]  # and is reshuffled
    for k in range(7):  # two ranks with batch 2 draw the rows one process draws with batch 4
        assert ranks[0].draw(k) + ranks[1].draw(k) == one.draw(k)
    passes = [s.full_pass() for s in ranks]
    assert len(passes[0]) == len(passes[1]) == 2  # the same number of forwards on every rank
    assert sorted(i for batches in passes for batch in batches for i in batch) == list(range(7))


def test_uniform_draws_hold_every_task_equally_and_walk_each_tasks_rows():
    row_tasks = [0] * 90 + [1] * 9 + [2] * 1  # a validation set dominated by task 0
    one = ValidationStream(size=100, batch_size=6, seed=3, row_tasks=row_tasks)
    ranks = [ValidationStream(size=100, batch_size=3, num_ranks=2, rank=r, seed=3, row_tasks=row_tasks) for r in range(2)]
    draws = [one.draw(k) for k in range(30)]
    for k, rows in enumerate(draws):
        assert sorted(row_tasks[i] for i in rows) == [0, 0, 1, 1, 2, 2]  # two rows of each task in each draw
        assert ranks[0].draw(k) + ranks[1].draw(k) == rows  # sharded as the proportional walk is
    walk = [i for rows in draws for i in rows]
    task1 = [i for i in walk if row_tasks[i] == 1]  # 60 rows of task 1: its 9 rows, pass after pass
    for p in range(6):
        assert sorted(task1[9 * p: 9 * p + 9]) == list(range(90, 99))
    assert task1[:9] != task1[9:18]  # reshuffled at each pass
    assert sorted(i for i in walk if row_tasks[i] == 0)[:60] == sorted(set(i for i in walk if row_tasks[i] == 0))
    again = ValidationStream(size=100, batch_size=6, seed=3, row_tasks=row_tasks)
    assert [again.draw(k) for k in (29, 3)] == [draws[29], draws[3]]  # a draw depends only on k: resume continues
    proportional = ValidationStream(size=100, batch_size=6, seed=3)
    missed = sum(all(row_tasks[i] != 2 for i in proportional.draw(k)) for k in range(30))
    assert missed > 20  # what uniform draws fix: the one-row task is absent from most proportional draws


def test_row_tasks_of_packed_rows_are_their_main_task():
    from datasets import Dataset

    from mft_trainer.coba_training import row_tasks

    packed = Dataset.from_list([
        {"task_ids": [0, 0, 1, 1, 1], "labels": [-100, 5, -100, 6, 7]},  # task 1 has more trained tokens
        {"task_ids": [2, 2, 0, -1], "labels": [-100, 4, 3, -100]},  # a tie: the lower id
    ])
    assert row_tasks(packed) == [1, 0]
    assert row_tasks(Dataset.from_list([{"task_id": 2}, {"task_id": 0}])) == [2, 0]


# ---- The trainer -----------------------------------------------------------------------------------


def test_coba_config_fields_are_validated(tmp_path):
    assert MFTConfig(output_dir=str(tmp_path), use_cpu=True, weighted_loss_mode="coba").coba_history_length == 200
    for field, value, message in [
        ("coba_warmup_steps", -1, "coba_warmup_steps"),
        ("coba_history_length", 1, "two points"),
        ("coba_tau", 0, "coba_tau"),
        ("coba_update_interval", 0, "coba_update_interval"),
        ("coba_sample_valid_num", 1.5, "coba_sample_valid_num"),
        ("coba_valid_sampling", "balanced", "coba_valid_sampling must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            MFTConfig(output_dir=str(tmp_path), use_cpu=True, weighted_loss_mode="coba", **{field: value})


def test_coba_without_an_eval_dataset_is_a_clear_error(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="needs an eval_dataset"):
        MFTTrainer(model=tiny_llama(64), args=MFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                        weighted_loss_mode="coba"),
                   train_dataset=Dataset.from_list(task_samples(2, seed=0)),
                   data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names(TASKS))


def test_a_task_without_validation_samples_is_a_clear_error(tmp_path):
    from datasets import Dataset

    trainer = coba_trainer(str(tmp_path), max_steps=1)
    trainer.eval_dataset = Dataset.from_list([s for s in task_samples(4, seed=2) if s["task_id"] != 1])
    with pytest.raises(ValueError, match=r"\['count'\] have no trained token"):
        trainer.train()


@pytest.fixture(scope="module")
def coba_run(tmp_path_factory):
    """10 steps of coba (warmup 3, window 4), a checkpoint every 4 steps."""
    out = tmp_path_factory.mktemp("coba_run")
    trainer = coba_trainer(str(out), max_steps=10, save_strategy="steps", save_steps=4)
    trainer.train()
    return trainer


def step_logs(trainer) -> dict[int, dict]:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_logs_carry_weights_and_validation_losses_beside_task_losses(coba_run):
    logs = step_logs(coba_run)
    assert sorted(logs) == list(range(1, 11))
    for step, log in logs.items():
        weights = [log[f"coba_weight/{name}"] for name in TASKS]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
        assert any(f"loss/{name}" in log for name in TASKS) and any(f"coba_valid_loss/{name}" in log for name in TASKS)
        if step < 3:  # warmup: the configured (equal) weights
            assert weights == pytest.approx([1 / 3] * 3)
    assert max(abs(logs[10][f"coba_weight/{name}"] - 1 / 3) for name in TASKS) > 0.01  # CoBa moved them
    # L_i(0) is logged at step 0 and is the per-task validation loss of the untrained model.
    initial = next(h for h in coba_run.state.log_history if h["step"] == 0)
    fresh = coba_trainer(str(coba_run.args.output_dir) + "-fresh", max_steps=1)
    metrics = fresh.evaluate()
    for name in TASKS:
        # (evaluation sums in float32)
        assert initial[f"coba_valid_loss/{name}"] == pytest.approx(metrics[f"eval_loss/{name}"], rel=1e-6)


def test_the_training_loss_uses_the_coba_weights(coba_run):
    trainer = coba_run
    weights = trainer.coba.balancer.weights
    assert (weights - 1 / 3).abs().max() > 0.01
    batch = DataCollatorForMFT(pad_token_id=0)(task_samples(2, seed=5))
    model = trainer.model
    model.train()
    trainer._step_normalizers = None  # counts from this batch
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token = per_token_cross_entropy(logits, batch["labels"])
    expected = reduce_loss(per_token, batch["labels"], batch["task_ids"], batch["segment_ids"], "case3",
                           count_normalizers([batch], 3), weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_validation_passes_leave_training_untouched(tmp_path):
    """With dropout on, CoBa's validation forwards (warmup beyond the run) leave the trained model
    exactly as case3 leaves it: no gradient, no RNG draw, training mode restored."""
    final = {}
    for mode in ("case3", "coba"):
        trainer = coba_trainer(str(tmp_path / mode), max_steps=4, weighted_loss_mode=mode, coba_warmup_steps=100,
                               coba_history_length=200)
        trainer.model.config.attention_dropout = 0.3
        for layer in trainer.model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        trainer.train()
        final[mode] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for name, value in final["case3"].items():
        assert torch.equal(value, final["coba"][name]), name
    assert trainer.coba.balancer.num_samples == 4  # it did sample


def test_checkpoints_hold_the_state_and_resume_is_exact(coba_run, tmp_path):
    checkpoint = os.path.join(coba_run.args.output_dir, "checkpoint-4")
    with open(os.path.join(checkpoint, "coba_state.json")) as f:
        state = json.load(f)
    assert state["num_samples"] == 4 and len(state["max_slopes"]) == 2  # updates after steps 3 and 4
    resumed = coba_trainer(str(tmp_path), max_steps=10, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=checkpoint)
    uninterrupted, after_resume = step_logs(coba_run), step_logs(resumed)
    assert sorted(after_resume) == list(range(1, 11))  # steps 1-4 come with the checkpoint's trainer state
    for step in range(5, 11):
        for key in ["loss"] + [f"coba_weight/{name}" for name in TASKS]:
            assert after_resume[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-9, abs=1e-12), (step, key)
    torch.testing.assert_close(resumed.coba.balancer.weights, coba_run.coba.balancer.weights, rtol=1e-9, atol=1e-12)
    assert resumed.coba.balancer.num_samples == coba_run.coba.balancer.num_samples == 10


@pytest.mark.distributed
def test_two_ranks_give_the_weights_of_one_process(tmp_path):
    """2 ranks (torchrun, gloo) x batch 2 (training and validation) against one process x batch 4."""
    out = tmp_path / "state"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "tests/distributed/coba_run.py", "--out", str(out), "--batch_size", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False)["state"] for r in range(2)]
    assert json.dumps(ranks[0]) == json.dumps(ranks[1])  # every rank holds the same state, to the bit

    one = coba_trainer(str(tmp_path / "one"), batch_size=4, eval_batch_size=4)
    one.train()
    reference = one.coba.balancer.state_dict()
    # Per-token cross-entropy is float32 (losses.per_token_cross_entropy), so loss sums grouped by rank
    # differ from the one-batch sums by ~1e-7 relative; the 4-point slope fits amplify that ~10x.
    np.testing.assert_allclose(ranks[0]["initial_losses"], reference["initial_losses"], rtol=1e-6)
    history = np.array(ranks[0]["history"], dtype=np.float64)  # None (missing) -> NaN
    np.testing.assert_allclose(history, np.array(reference["history"], dtype=np.float64), rtol=1e-6)
    assert ranks[0]["num_samples"] == reference["num_samples"] == 10
    np.testing.assert_allclose(ranks[0]["weights"], reference["weights"], rtol=0, atol=1e-5)
    assert max(abs(w - 1 / 3) for w in reference["weights"]) > 0.01


def test_uniform_validation_sampling_draws_the_tasks_equally_in_training(tmp_path):
    """coba_valid_sampling uniform: every CoBa draw in a run holds each task's rows equally, on an
    eval set where one task has most rows."""
    from datasets import Dataset

    trainer = coba_trainer(str(tmp_path), max_steps=4, eval_batch_size=3, coba_valid_sampling="uniform")
    eval_rows = task_samples(6, seed=2)
    trainer.eval_dataset = Dataset.from_list([r for r in eval_rows if r["task_id"] == 0] * 4 + eval_rows)
    drawn = []
    measure = trainer.coba.validation_losses
    trainer.coba.validation_losses = lambda batches: drawn.append(batches) or measure(batches)
    trainer.train()
    task_of = [int(t) for t in trainer.coba.validation_set["task_id"]]
    sample_draws = drawn[1:]  # the first measure is the full pass for L_i(0)
    assert len(sample_draws) == 4
    for (rows,) in sample_draws:
        assert sorted(task_of[i] for i in rows) == [0, 1, 2]


def test_a_balancer_built_by_hand_rejects_out_of_range_settings():
    with pytest.raises(ValueError, match=r"out of range: num_tasks=0, history_length=1"):
        CoBaBalancer(0, history_length=1)
    with pytest.raises(ValueError, match=r"out of range: tau=nan"):
        CoBaBalancer(2, tau=math.nan)
