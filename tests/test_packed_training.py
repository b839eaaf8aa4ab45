"""MFTTrainer on packed batches: one training step gives the gradient, loss and per-task losses of
the same samples padded, in every loss mode (a sample of case2/case4 is a segment of a row)."""

import dataclasses

import pytest
import torch
from datasets import Dataset

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.packing import pack_dataset

from .distributed.one_step import MODES, TASK_WEIGHTS, VOCAB, make_samples
from .helpers import tiny_llama

SEQ_LENGTH = 24


def one_step(mode, dataset, collator, batch_size, accumulation, output_dir):
    """One SGD step at learning rate 1 (the update is minus the gradient); returns the update and the log."""
    model = tiny_llama(VOCAB, seed=0, dtype=torch.float64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = MFTConfig(
        output_dir=output_dir, weighted_loss_mode=mode,
        task_weights=TASK_WEIGHTS if mode in ("case3", "case4") else None,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_steps=1,
    )
    trainer = MFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         tasks=TaskRegistry.from_names(["a", "b", "c"]))
    trainer.train()
    update = {name: p.detach() - before[name] for name, p in trainer.model.named_parameters()}
    return update, trainer.state.log_history[0]


class PositionsNotReset(DataCollatorForMFT):
    """A broken packed collator: positions count through the whole row, as MFTCoder's pack mode does."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
        del batch["cu_seq_lens_q"], batch["cu_seq_lens_k"], batch["max_length_q"], batch["max_length_k"]
        return batch


@pytest.fixture(scope="module")
def layouts():
    samples = make_samples()
    packed, summary = pack_dataset(Dataset.from_list(samples), SEQ_LENGTH, seed=0)
    assert 1 < summary.rows < len(samples)
    return samples, packed, summary.rows


@pytest.mark.parametrize("mode", MODES)
def test_packed_and_padding_free_steps_equal_the_padded_step(tmp_path, layouts, mode):
    samples, packed, rows = layouts
    out = str(tmp_path)
    expected, expected_log = one_step(mode, Dataset.from_list(samples), DataCollatorForMFT(pad_token_id=0), 8, 1, out)
    pack = DataCollatorForMFT(0, padding_mode="pack")
    runs = {
        "pack, all rows in one batch": one_step(mode, packed, pack, rows, 1, out),
        "pack, one row per micro-batch": one_step(mode, packed, pack, 1, rows, out),
        "padding_free": one_step(
            mode, Dataset.from_list(samples), DataCollatorForMFT(0, padding_mode="padding_free"), 8, 1, out
        ),
    }
    for what, (update, log) in runs.items():
        for name in expected:
            torch.testing.assert_close(update[name], expected[name], rtol=1e-6, atol=1e-10,
                                       msg=lambda m: f"{mode} {what} {name}: {m}")
        assert log["loss"] == pytest.approx(expected_log["loss"], rel=1e-6)  # summed in float32 by the Trainer
        for task in "abc":
            assert log[f"loss/{task}"] == pytest.approx(expected_log[f"loss/{task}"], rel=1e-6)  # logged in float32

    broken, _ = one_step(mode, packed, PositionsNotReset(0, padding_mode="pack"), rows, 1, out)
    difference = max((broken[name] - expected[name]).abs().max().item() for name in expected)
    assert difference > 1e-4, "positions not reset must change the gradient"


def test_evaluation_gives_the_same_losses_in_every_layout(tmp_path, tokenizer, example_task_dirs):
    """eval_loss and eval_loss/<task> of the bundled validation samples do not depend on the layout."""
    from mft_trainer import DataConfig, build_mft_dataset

    config = DataConfig(data_paths=example_task_dirs, data_split="80,20", dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)
    packed, _ = pack_dataset(data.valid, seq_length=512, seed=0)
    layouts = {"padding": data.valid, "pack": packed, "padding_free": data.valid}
    model = tiny_llama(len(tokenizer), seed=0)  # float32: float64 over GPT-2's vocabulary is slow on a CPU
    args = MFTConfig(output_dir=str(tmp_path), weighted_loss_mode="case4", per_device_eval_batch_size=4,
                     report_to=[], use_cpu=True, disable_tqdm=True)
    metrics = {}
    for layout, dataset in layouts.items():
        trainer = MFTTrainer(model=model, args=args, eval_dataset=dataset, tasks=data.tasks,
                             data_collator=DataCollatorForMFT(0, padding_mode=layout))
        metrics[layout] = trainer.evaluate()
    names = [key for key in metrics["padding"] if key.startswith("eval_loss")]
    assert len(names) == 5  # eval_loss and one per task
    for layout in ("pack", "padding_free"):
        for name in names:
            assert metrics[layout][name] == pytest.approx(metrics["padding"][name], rel=1e-5), (layout, name)


class PackingCollator:
    """A collator of the user's own, with no padding_mode attribute, that packs rows."""

    def __call__(self, features):
        return DataCollatorForMFT(0, padding_mode="pack")(features)


def test_packed_batches_of_any_collator_are_checked_against_leaks(tmp_path, layouts):
    """The leak check holds for a collator that does not say it packs: at its first packed batch."""
    from transformers import LlamaForCausalLM

    from mft_trainer.attention import PackingError

    from .test_attention import LeakyLlama

    _, packed, rows = layouts
    args = MFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=rows, report_to=[],
                     use_cpu=True, disable_tqdm=True, save_strategy="no")
    tasks = TaskRegistry.from_names(["a", "b", "c"])
    leaky = LeakyLlama(tiny_llama(VOCAB).config)
    trainer = MFTTrainer(model=leaky, args=args, train_dataset=packed, data_collator=PackingCollator(), tasks=tasks)
    with pytest.raises(PackingError, match="lets packed samples see each other"):
        trainer.train()
    # (label_names: the Trainer reads them from forward's signature, which LeakyLlama's hides)
    evaluating = MFTTrainer(model=leaky, args=dataclasses.replace(args, label_names=["labels"]), eval_dataset=packed,
                            data_collator=PackingCollator(), tasks=tasks)
    with pytest.raises(PackingError, match="lets packed samples see each other"):
        evaluating.evaluate()
    honest = MFTTrainer(model=tiny_llama(VOCAB), args=args, train_dataset=packed, data_collator=PackingCollator(),
                        tasks=tasks)
    honest.train()
    assert honest.packing.checked and isinstance(honest.model, LlamaForCausalLM)
