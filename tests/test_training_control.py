"""Early stopping (MFTCoder's early_stopping_stall_num), the best checkpoint kept; diverging runs (non-finite
losses, gradients, weights) stopped before anything damaged is saved, collapsed runs reported."""

import logging
import math

import pytest
import safetensors.torch
import torch
from datasets import Dataset
from transformers import TrainerCallback

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.divergence import NonFiniteError, NonFiniteGradientError, NonFiniteLossError, NonFiniteWeightsError

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
    """Turns one weight into NaN, as a diverging run would: at the end of optimizer step `step`
    (after the update, before its checkpoint), or with `before=True` at its beginning."""

    def __init__(self, step: int, before: bool = False):
        self.step, self.before = step, before

    def poison(self, model):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.before and state.global_step + 1 == self.step:
            self.poison(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.before and state.global_step == self.step:
            self.poison(model)


class PoisonGradient(TrainerCallback):
    """Makes the gradient of optimizer step `step` NaN while its loss stays finite (a NaN gradient
    from a finite loss is what a learning rate far too high gives: see the test below)."""

    def __init__(self, step: int):
        self.step, self.armed, self.hook = step, False, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hook = next(model.parameters()).register_hook(lambda grad: grad * float("nan") if self.armed else grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 == self.step


def saved_weights(checkpoint):
    return safetensors.torch.load_file(str(checkpoint / "model.safetensors"))


def test_non_finite_loss_stops_with_the_step_and_saves_no_broken_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PoisonWeights(step=3, before=True)], learning_rate=1e-3, save_steps=1)
    with pytest.raises(NonFiniteLossError, match="the loss is nan at optimizer step 3: training stopped before the "
                                                 "optimizer applied it; the last checkpoint, .*checkpoint-2, holds"):
        trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir()
    assert not (tmp_path / "checkpoint-3").exists()


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_optimizer_applies_it(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PoisonGradient(step=2)], learning_rate=1e-3, save_steps=1)
    with pytest.raises(NonFiniteGradientError, match=r"the gradient norm is nan at optimizer step 2 \(its loss is "
                                                     r"finite\): training stopped before the optimizer applied it; "
                                                     r"the last checkpoint, .*checkpoint-1, holds finite weights"):
        trainer.train()
    assert not (tmp_path / "checkpoint-2").exists()
    # The weights in memory are those of checkpoint-1: the NaN update was not applied.
    for name, value in saved_weights(tmp_path / "checkpoint-1").items():
        torch.testing.assert_close(dict(trainer.model.named_parameters())[name].detach(), value)


def test_a_huge_learning_rate_is_never_silent_and_saves_no_non_finite_weights(tmp_path, caplog):
    """With learning rate 1e6 the loss of step 2 is finite (ln(64)) but its gradient is NaN here: the
    optimizer used to apply it and checkpoint-2 held NaN weights. (Where the arithmetic collapses
    to a gradient of 0 instead, the run must say so.)"""
    trainer = make_trainer(tmp_path, learning_rate=1e6, save_steps=1, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="mft_trainer"):
        try:
            trainer.train()
            stopped = False
        except NonFiniteError:
            stopped = True
    assert stopped or "training collapsed" in caplog.text
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints  # step 1 was fine
    for checkpoint in checkpoints:
        assert all(torch.isfinite(value).all() for value in saved_weights(checkpoint).values()), checkpoint


@pytest.mark.parametrize("save_steps,when,not_saved", [
    (1, "after optimizer step 2", "checkpoint-2 was not saved"),
    (100, "at the end of training", "training stopped before they were saved"),
])
def test_non_finite_weights_are_not_saved(tmp_path, save_steps, when, not_saved):
    """An update can overflow with a finite gradient (and DeepSpeed steps inside the backward pass):
    the weights are checked before every checkpoint and at the end of training."""
    trainer = make_trainer(tmp_path, callbacks=[PoisonWeights(step=2)], learning_rate=1e-3, max_steps=2,
                           save_steps=save_steps, save_strategy="steps" if save_steps == 1 else "no")
    with pytest.raises(NonFiniteWeightsError, match=f"the trainable weights {when} are not finite "
                                                    rf"\(model.embed_tokens.weight\): .*{not_saved}"):
        trainer.train()
    assert not (tmp_path / "checkpoint-2").exists()


def test_a_collapsed_run_is_reported(tmp_path, caplog):
    """Activations that overflow (as after steps at learning rate 1e6) make the normalisation layers
    output 0: the gradient is exactly 0 and the loss stays at ln(vocab size); the run used to end
    without a word."""
    trainer = make_trainer(tmp_path, max_steps=3, save_strategy="no", learning_rate=1e-3)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.mul_(1e30)
    with caplog.at_level(logging.WARNING, logger="mft_trainer"):
        result = trainer.train()
    assert result.training_loss == pytest.approx(math.log(64))
    assert "optimizer step 1: the gradient is exactly 0 although the step trains" in caplog.text
    assert ("training collapsed: 3 of the 3 optimizer steps had a gradient of exactly 0 (the first: step 1), so the "
            "model learnt nothing from them; train_loss 4.1589 (ln(vocab size 64) = 4.1589") in caplog.text


def test_a_healthy_run_reports_no_collapse(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mft_trainer"):
        make_trainer(tmp_path, max_steps=3, save_strategy="no", learning_rate=1e-3).train()
    assert "gradient is exactly 0" not in caplog.text and "collapsed" not in caplog.text


class RecordingHub:
    """Stands in for transformers' HfApi: records the files of every uploaded folder, as they are then."""

    def __init__(self):
        self.uploads: list[tuple[str, set[str]]] = []

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=f"user/{repo_id}" if "/" not in repo_id else repo_id)

    def upload_folder(self, folder_path, commit_message="", run_as_future=False, ignore_patterns=(), **kwargs):
        import fnmatch
        from concurrent.futures import Future
        from pathlib import Path

        files = {str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()}
        files = {f for f in files if not any(fnmatch.fnmatch(f.split("/")[0], pattern) for pattern in ignore_patterns)}
        self.uploads.append((commit_message, files))
        job = Future()
        job.set_result(None)
        return job if run_as_future else None


def test_hub_pushes_carry_every_run_artifact(tmp_path, monkeypatch):
    """push_to_hub: the final push and every checkpoint push hold tasks.json, run_config.yaml and the
    generation config beside the model (the Trainer pushed before MFTTrainer had written them)."""
    import transformers.trainer

    hub = RecordingHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    monkeypatch.setattr(MFTTrainer, "create_model_card", lambda self, **kwargs: None)
    args = MFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_steps=1,
                     push_to_hub=True, hub_model_id="user/run", hub_strategy="every_save", report_to=[],
                     use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = MFTTrainer(model=tiny_llama(64), args=args, train_dataset=Dataset.from_list(make_samples()),
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names(["a", "b", "c"]),
                         run_config={"data": {"chat_template": "mftcoder"}})
    trainer.train()
    trainer.save_model()
    assert len(hub.uploads) >= 3  # two checkpoints, then the final save
    for message, files in hub.uploads:
        assert {"tasks.json", "run_config.yaml", "generation_config.json", "model.safetensors"} <= files, message
    assert hub.uploads[-1][0] == "Model save"
