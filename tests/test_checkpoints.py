"""Checkpoints: resume only from complete ones; a save that fails (a full disk) says where and why."""

import errno
import logging
import os
import re
import runpy
import shutil
import sys

import pytest
import torch
from transformers import TrainerCallback

from mft_trainer.checkpoints import (
    CheckpointSaveError,
    IncompleteCheckpointError,
    checkpoint_problems,
    last_complete_checkpoint,
    save_failure_message,
)

from .conftest import REPO
from .test_training_control import make_trainer


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps with checkpoint-2 and checkpoint-4, and its weights at the end."""
    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(out, max_steps=4, save_steps=2, learning_rate=1e-3)
    trainer.train()
    return out, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.fixture
def run(four_steps, tmp_path):
    """A copy of the 4-step run's output directory, free to damage."""
    out = tmp_path / "run"
    shutil.copytree(four_steps[0], out)
    return out


class CountSteps(TrainerCallback):
    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def truncate(path, keep=0.5):
    os.truncate(path, int(path.stat().st_size * keep))


def test_the_trainers_checkpoints_are_complete(run):
    assert checkpoint_problems(run / "checkpoint-2") == []
    assert checkpoint_problems(run / "checkpoint-4") == []


def test_auto_resume_skips_an_incomplete_checkpoint_with_a_warning_naming_it(run, four_steps, caplog):
    """As a full disk leaves it: no trainer_state.json, a truncated optimizer.pt."""
    (run / "checkpoint-4" / "trainer_state.json").unlink()
    truncate(run / "checkpoint-4" / "optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="mft_trainer"):
        assert last_complete_checkpoint(run) == str(run / "checkpoint-2")
    warning = caplog.text
    assert "skipping the incomplete checkpoint" in warning and "checkpoint-4" in warning
    assert "trainer_state.json is missing" in warning and "optimizer.pt is truncated" in warning

    # MFTTrainer.train(resume_from_checkpoint=True) resumes from checkpoint-2, and ends as the run did.
    steps = CountSteps()
    trainer = make_trainer(run, callbacks=[steps], max_steps=4, save_steps=2, learning_rate=1e-3)
    trainer.train(resume_from_checkpoint=True)
    assert steps.count == 2  # steps 3 and 4
    for name, value in four_steps[1].items():
        torch.testing.assert_close(dict(trainer.model.named_parameters())[name].detach(), value)


@pytest.mark.parametrize("damage,problem", [
    (lambda c: (c / "optimizer.pt").unlink(), "the optimizer state (optimizer.pt) is missing"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    (lambda c: (c / "model.safetensors").unlink(), "the model weights are missing"),
    (lambda c: truncate(c / "rng_state.pth", 0.9), "rng_state.pth is truncated"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hist'), "trainer_state.json is not valid"),
])
def test_a_named_incomplete_checkpoint_is_refused_with_what_it_lacks(run, damage, problem):
    checkpoint = run / "checkpoint-4"
    damage(checkpoint)
    trainer = make_trainer(run, max_steps=6, save_steps=2)
    with pytest.raises(IncompleteCheckpointError, match=re.escape(f"cannot resume from {checkpoint}: ") + ".*" +
                       re.escape(problem)):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0  # refused before anything ran


def test_resume_true_without_a_complete_checkpoint_is_an_error(run):
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        (run / checkpoint / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        make_trainer(run, max_steps=4).train(resume_from_checkpoint=True)


def fill_the_disk_at(monkeypatch, checkpoint):
    """torch.save writes the start of `checkpoint`/optimizer.pt, then fails as on a full disk."""
    save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f) == str(checkpoint / "optimizer.pt"):
            with open(f, "wb") as start:
                start.write(b"PK\x03\x04" + b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)


def test_a_full_disk_while_saving_names_the_checkpoint_and_resume_skips_it(tmp_path, monkeypatch, caplog):
    checkpoint = tmp_path / "checkpoint-4"
    fill_the_disk_at(monkeypatch, checkpoint)
    trainer = make_trainer(tmp_path, max_steps=4, save_steps=2)
    with pytest.raises(CheckpointSaveError) as error:
        trainer.train()
    message = str(error.value)
    assert f"saving the checkpoint to {checkpoint} failed (OSError: [Errno 28] No space left on device)" in message
    assert "the disk is full" in message
    assert f"{checkpoint} is incomplete: resume_from_checkpoint auto skips it" in message
    with caplog.at_level(logging.WARNING, logger="mft_trainer"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4" in caplog.text and "optimizer.pt is truncated" in caplog.text


def test_a_failed_save_of_the_model_names_the_directory(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1, save_strategy="no")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer.model, "save_pretrained", full)
    with pytest.raises(CheckpointSaveError, match=re.escape(f"saving the model to {tmp_path / 'final'} failed") +
                       ".*the disk is full"):
        trainer.save_model(str(tmp_path / "final"))


def test_train_script_refuses_a_named_incomplete_checkpoint_before_loading_anything(run, monkeypatch, capsys):
    import mft_trainer
    import mft_trainer.modeling

    def not_now(*args, **kwargs):
        raise AssertionError("loaded before the checkpoint was checked")

    monkeypatch.setattr(mft_trainer, "build_mft_dataset", not_now)
    monkeypatch.setattr(mft_trainer.modeling, "load_tokenizer", not_now)
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", str(REPO / "examples/recipes/demo.yaml"),
                                      "--output_dir", str(run), "--resume_from_checkpoint", str(run / "checkpoint-4")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert f"error: cannot resume from {run / 'checkpoint-4'}: the optimizer state (optimizer.pt) is missing" in \
        capsys.readouterr().err


def test_a_full_disk_is_recognised_by_its_free_space_when_torch_hides_the_cause(tmp_path, monkeypatch):
    """torch reports a write to a full disk as '[enforce fail at inline_container.cc:672] . unexpected pos'."""
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6464 vs 6352")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    message = save_failure_message(tmp_path / "checkpoint-4", "checkpoint", error)
    assert message.startswith(f"saving the checkpoint to {tmp_path / 'checkpoint-4'} failed (RuntimeError: [enforce")
    assert "the disk is full (0 MiB free on the disk that holds it)" in message
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**30))
    assert "the disk is full" not in save_failure_message(tmp_path / "checkpoint-4", "checkpoint", error)
