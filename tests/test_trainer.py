"""MFTTrainer: exact gradients across accumulation and ranks, MoE aux loss, metrics, end to end."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from mft_trainer import DataConfig, MFTConfig, MFTTrainer, TaskRegistry, build_mft_dataset
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.losses import count_normalizers, per_token_cross_entropy, reduce_loss

from .conftest import REPO
from .distributed.evaluate import LAYOUTS as EVAL_LAYOUTS
from .distributed.evaluate import METRICS as EVAL_METRICS
from .distributed.evaluate import evaluate as evaluate_samples
from .distributed.one_step import MODES, make_samples, one_step, one_step_update
from .helpers import tiny_llama


@pytest.fixture(scope="module")
def one_batch_runs(tmp_path_factory):
    """The reference: the 8 samples as one batch, one process, no accumulation: {mode: (update, training_loss)}."""
    out = str(tmp_path_factory.mktemp("ref"))
    return {mode: one_step(mode, batch_size=8, accumulation=1, output_dir=out, loss_implementation="plain")
            for mode in MODES}


@pytest.fixture(scope="module")
def one_batch_updates(one_batch_runs):
    return {mode: update for mode, (update, _) in one_batch_runs.items()}


def assert_same_updates(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-10, msg=lambda m: f"{what} {name}: {m}")
    assert sum(v.abs().sum() for v in expected.values()) > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size,accumulation", [(2, 4), (4, 2), (1, 8)])
def test_accumulation_gives_the_one_batch_gradient(tmp_path, one_batch_updates, mode, batch_size, accumulation):
    update = one_step_update(mode, batch_size, accumulation, str(tmp_path))
    assert_same_updates(update, one_batch_updates[mode], f"{mode} batch {batch_size} x accumulation {accumulation}:")


def test_modes_give_different_gradients(one_batch_updates):
    """Guards the equality tests: the four reductions really differ on these samples."""
    norms = {mode: sum(v.pow(2).sum() for v in one_batch_updates[mode].values()).item() for mode in MODES}
    assert len({round(n, 8) for n in norms.values()}) == 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, *arguments: str) -> None:
    """A script of tests/distributed on 2 torchrun ranks (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         f"tests/distributed/{script}", *arguments],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def run_two_ranks(tmp_path, *extra: str) -> dict:
    """tests/distributed/one_step.py on 2 torchrun ranks (gloo) x batch 2 x accumulation 2: {"updates":
    {mode: update}, "training_loss": {mode: [rank 0's, rank 1's]}}."""
    out = tmp_path / "updates.pt"
    run_torchrun("one_step.py", "--out", str(out), "--batch_size", "2", "--accumulation", "2", *extra)
    return torch.load(out)


@pytest.mark.distributed
def test_two_ranks_give_the_one_batch_gradient_and_training_loss(tmp_path, one_batch_runs):
    """Task b is absent from rank 0, task c from rank 1. The step is not logged, so training_loss is
    the loss the Trainer adds at the end from each rank's own accumulator (rank 0 reported 2x its
    own share before MFTTrainer averaged it over the ranks)."""
    result = run_two_ranks(tmp_path, "--logging_steps", "2")
    for mode in MODES:
        update, training_loss = one_batch_runs[mode]
        assert_same_updates(result["updates"][mode], update, f"{mode} 2 ranks:")
        assert result["training_loss"][mode] == pytest.approx([training_loss] * 2, rel=1e-6), mode  # float32 sums


@pytest.fixture(scope="module")
def one_batch_updates_float32(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref32"))
    return {mode: one_step_update(mode, 8, 1, out, dtype=torch.float32, loss_implementation="plain") for mode in MODES}


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["deepspeed zero2", "deepspeed zero3", "fsdp2"])
def test_sharded_backends_on_two_ranks_give_the_one_batch_gradient(tmp_path, one_batch_updates_float32, backend):
    """DeepSpeed ZeRO-2/3 and FSDP2 on 2 CPU ranks through HF's integrations (float32: ZeRO-3 has no float64)."""
    if backend.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        extra = ["--deepspeed", f"ds_configs/{backend.split()[1]}.json"]
    else:
        extra = ["--fsdp_config", "fsdp_configs/fsdp2.json"]
    updates = run_two_ranks(tmp_path, *extra, "--dtype", "float32")["updates"]
    reference = one_batch_updates_float32
    for mode in MODES:
        for name in reference[mode]:
            torch.testing.assert_close(updates[mode][name], reference[mode][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{backend} {mode} {name}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["deepspeed zero3", "fsdp2"])
def test_sharded_backends_with_tied_embeddings_give_the_one_batch_gradient(tmp_path, backend):
    """The chunked loss returns the output layer's gradient itself; with the weight shared by the input
    embedding and sharded, both gradients must still add up (float32)."""
    if backend.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        extra = ["--deepspeed", f"ds_configs/{backend.split()[1]}.json"]
    else:
        extra = ["--fsdp_config", "fsdp_configs/fsdp2.json"]
    updates = run_two_ranks(tmp_path, *extra, "--dtype", "float32", "--tie_word_embeddings")["updates"]
    for mode in MODES:
        reference = one_step_update(mode, 8, 1, str(tmp_path / "ref"), dtype=torch.float32, tie_word_embeddings=True,
                                    loss_implementation="plain")
        assert "lm_head.weight" not in reference  # one shared parameter
        for name in reference:
            torch.testing.assert_close(updates[mode][name], reference[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{backend} {mode} {name}: {m}")


@pytest.mark.distributed
def test_eval_on_two_ranks_counts_every_sample_once(tmp_path):
    """8 samples on 2 ranks x batch 3: accelerate gives both ranks 2 batches, so 4 slots are not
    samples of the set; the eval losses must still be those of the 8 samples, in every loss mode and
    batch layout (the completing samples used to be counted twice), and compute_metrics must see
    the 8 samples' predictions only."""
    out = tmp_path / "metrics.json"
    run_torchrun("evaluate.py", "--out", str(out), "--batch_size", "3")
    two_ranks = json.loads(out.read_text())
    with_metrics = {f"case1 padding {variant}" for variant in EVAL_METRICS}
    assert set(two_ranks) == {f"{mode} {layout}" for mode in MODES for layout in EVAL_LAYOUTS} | with_metrics
    for key, metrics in two_ranks.items():
        mode, layout, *variant = key.split(maxsplit=2)
        reference = evaluate_samples(mode, layout, 8, str(tmp_path / "ref"), *variant)
        assert metrics.keys() == reference.keys() >= {"eval_loss", "eval_loss/a", "eval_loss/b", "eval_loss/c"}
        if variant:
            assert metrics["eval_items"] == metrics["predicted_items"] == 8, key
        for name in reference:
            assert metrics[name] == pytest.approx(reference[name], rel=1e-6), f"{key} {name}"  # float32 sums


def loss_of_one_batch(model, batch, mode, weights):
    """The mode's loss of `batch` computed directly with the loss functions, and the per-token losses."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = per_token_cross_entropy(logits, batch["labels"])
    normalizers = count_normalizers([batch], len(weights))
    loss = reduce_loss(per_token, batch["labels"], batch["task_ids"], batch["segment_ids"], mode, normalizers, weights)
    return loss, per_token


def test_logged_step_loss_is_the_reduction_of_the_whole_batch(tmp_path):
    """The loss the Trainer logs for a step under accumulation is the mode's loss of the 8 samples."""
    samples = make_samples()
    model = tiny_llama(64, seed=0, dtype=torch.float64)
    collator = DataCollatorForMFT(pad_token_id=0)
    batch = collator(samples)
    expected, per_token = loss_of_one_batch(model, batch, "case4", torch.tensor([1.0, 3.0, 0.5]))

    args = MFTConfig(output_dir=str(tmp_path), weighted_loss_mode="case4", task_weights={"b": 3.0, "c": 0.5},
                     per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1, learning_rate=0.0,
                     train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True,
                     logging_steps=1, disable_tqdm=True)
    trainer = MFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(samples), data_collator=collator,
                         tasks=TaskRegistry.from_names(["a", "b", "c"]))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-7)  # the Trainer sums logged losses in float32
    # loss/<task> is the token-mean cross-entropy of each task
    mask = batch["labels"] != -100
    mask[:, 0] = False
    for task_id, name in enumerate("abc"):
        in_task = mask & (batch["task_ids"] == task_id)
        assert logged[f"loss/{name}"] == pytest.approx(per_token[in_task].mean().item(), rel=1e-6)  # logged in float32


def test_moe_router_aux_loss_is_added_as_transformers_does(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5)
    model = MixtralForCausalLM(config)  # float32: the grouped expert matmul has no float64 kernel
    samples = make_samples()
    batch = DataCollatorForMFT(pad_token_id=0)(samples)
    args = MFTConfig(output_dir=str(tmp_path), weighted_loss_mode="case1", report_to=[], use_cpu=True)
    trainer = MFTTrainer(model=model, args=args, data_collator=DataCollatorForMFT(pad_token_id=0),
                         tasks=TaskRegistry.from_names(["a", "b", "c"]))
    model.train()
    ours = trainer.compute_loss(model, batch)
    # transformers' own loss: token-mean CE over the batch + router_aux_loss_coef * aux_loss
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert reference.aux_loss > 0
    assert ours.item() == pytest.approx(reference.loss.item(), rel=1e-6)


def test_missing_task_keys_and_bad_arguments_are_clear_errors(tmp_path):
    tasks = TaskRegistry.from_names(["a"])
    with pytest.raises(ValueError, match="tasks=<TaskRegistry>"):
        MFTTrainer(model=tiny_llama(64), args=MFTConfig(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(TypeError, match="MFTConfig"):
        from transformers import TrainingArguments

        MFTTrainer(model=tiny_llama(64), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True), tasks=tasks)
    trainer = MFTTrainer(model=tiny_llama(64), args=MFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=tasks)
    with pytest.raises(ValueError, match="DataCollatorForMFT"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                             "labels": torch.ones(1, 3, dtype=torch.long)})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weighted_loss_mode": "case9"}, "weighted_loss_mode must be one of case1"),
        ({"weighted_loss_mode": "coba", "coba_warmup_steps": -1}, "coba_warmup_steps must be an integer >= 0"),
        ({"weighted_loss_mode": "case1", "task_weights": {"a": 2.0}}, "task-balanced modes"),
        ({"task_weights": {"a": -1}}, ">= 0"),
        ({"task_weights": [1, 2]}, "mapping"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ],
)
def test_config_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFTConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_config_accepts_aliases(tmp_path):
    assert MFTConfig(output_dir=str(tmp_path), use_cpu=True, weighted_loss_mode="task_sample").weighted_loss_mode == "case4"


def test_end_to_end_on_example_data(tmp_path, tokenizer, example_task_dirs):
    """A short run on the bundled data: per-task losses logged and decreasing, per-task evaluation,
    a checkpoint with tasks.json, and the per-task losses in TensorBoard."""
    data = build_mft_dataset(
        DataConfig(data_paths=example_task_dirs, data_split="80,20", seq_length=256, dataset_cache_dir="none"),
        tokenizer,
    )
    model = tiny_llama(len(tokenizer), seed=0)
    args = MFTConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=12,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=4, eval_strategy="steps", eval_steps=12,
        save_steps=12, report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
        weighted_loss_mode="case3", task_weights={"code_completion": 2.0},
    )
    trainer = MFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.valid,
                         processing_class=tokenizer, tasks=data.tasks)
    assert trainer.tasks.weights == (1.0, 1.0, 1.0, 2.0)
    trainer.train()

    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 3 and len(eval_logs) == 1
    for name in data.tasks.names:
        # A small task may be absent from a logging window: compare its first and last logged values.
        values = [h[f"loss/{name}"] for h in train_logs if f"loss/{name}" in h]
        assert len(values) >= 2 and values[-1] < values[0], (name, values)
        assert f"eval_loss/{name}" in eval_logs[0]
    checkpoint = tmp_path / "run" / "checkpoint-12"
    assert TaskRegistry.load(checkpoint) == trainer.tasks
    assert (checkpoint / "model.safetensors").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")}
    tags = set()
    for event_dir in event_dirs:
        accumulator = EventAccumulator(str(event_dir))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss/code_qa", "eval/loss/code_qa", "train/loss"} <= tags


@pytest.mark.parametrize("mode", MODES)
def test_eval_loss_is_the_mode_over_the_whole_set_whatever_the_batch_size(tmp_path, mode):
    samples = make_samples()
    model = tiny_llama(64, seed=0, dtype=torch.float64)
    collator = DataCollatorForMFT(pad_token_id=0)
    expected, _ = loss_of_one_batch(model, collator(samples), mode, torch.ones(3))
    for eval_batch_size in (8, 3, 1):
        args = MFTConfig(output_dir=str(tmp_path), weighted_loss_mode=mode, per_device_eval_batch_size=eval_batch_size,
                         report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = MFTTrainer(model=model, args=args, eval_dataset=Dataset.from_list(samples), data_collator=collator,
                             tasks=TaskRegistry.from_names(["a", "b", "c"]))
        metrics = trainer.evaluate()
        assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-6), eval_batch_size
        assert set(k for k in metrics if k.startswith("eval_loss/")) == {"eval_loss/a", "eval_loss/b", "eval_loss/c"}


@pytest.mark.parametrize("settings,enabled", [
    ({}, True),  # on by default, as in MFTCoder
    ({"gradient_checkpointing": False}, False),  # MFTCoder's name
    ({"gradient_checkpointing": True}, True),
    ({"activation_checkpointing": False}, False),  # transformers' new name
])
def test_either_checkpointing_name_works_without_a_deprecation_warning(settings, enabled, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
        args = MFTConfig(output_dir=str(tmp_path), use_cpu=True, **settings)
    assert args.gradient_checkpointing is enabled
    assert getattr(args, "activation_checkpointing", enabled) is enabled
    if enabled:
        assert (args.gradient_checkpointing_kwargs or {}).get("use_reentrant") is False
