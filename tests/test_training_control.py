"""Early stopping (MFTCoder's early_stopping_stall_num), the best checkpoint kept, non-finite losses."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.trainer import NonFiniteLossError

from .distributed.one_step import make_samples
from .helpers import tiny_llama


def make_trainer(tmp_path, callbacks=(), **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, logging_steps=1,
                    report_to=[], use_cpu=True, disable_tqdm=True, save_steps=2)
    settings.update(overrides)
    samples = Dataset.from_list(make_samples())
    return MFTTrainer(model=tiny_llama(64), args=MFTConfig(**settings), train_dataset=samples, eval_dataset=samples,
                      data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names("abc"),
                      callbacks=list(callbacks))


def test_early_stopping_stops_after_patience_evaluations_and_keeps_the_best_checkpoint(tmp_path):
    # learning rate 0: the evaluation loss never improves after the first evaluation
    trainer = make_trainer(tmp_path, learning_rate=0.0, eval_strategy="steps", eval_steps=2,
                           early_stopping_patience=2, save_total_limit=1, metric_for_best_model="eval_loss/a")
    trainer.train()
    assert trainer.state.global_step == 6  # evaluations at 2 (best), 4 and 6 (no improvement twice)
    assert trainer.args.load_best_model_at_end
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert (tmp_path / "checkpoint-2").is_dir()  # save_total_limit=1 does not delete the best


def test_early_stopping_needs_evaluation(tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluation"):
        MFTConfig(output_dir=str(tmp_path), use_cpu=True, early_stopping_patience=3)


class PoisonWeights(TrainerCallback):
    """Turns one weight into NaN after the given step, as a diverging run would."""

    def __init__(self, after_step: int):
        self.after_step = after_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.after_step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")


def test_non_finite_loss_stops_with_the_step_and_saves_no_broken_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PoisonWeights(after_step=2)], learning_rate=1e-3, save_steps=1)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3"):
        trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir()
    assert not (tmp_path / "checkpoint-3").exists()
