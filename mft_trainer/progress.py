"""One progress bar for a training run.

The Trainer's `ProgressCallback` opens a second bar for every evaluation inside training, nested
under the training bar. Where output goes to a file or a notebook cell (not a terminal that moves
the cursor), the nested bar leaves cursor-up codes (`\\x1b[A`) and half-drawn lines in the log at
every evaluation. `TrainingProgressCallback` keeps the training bar and the logged metrics, and
shows an evaluation's bar inside training only on a terminal (where tqdm redraws it in place); an
evaluation on its own (`trainer.evaluate()` outside `train()`) keeps its bar everywhere.

Data preparation shows `datasets`' bars only for steps long enough to need one
(`data_progress_bars`): a small task's four bars (loading, validating, tokenizing, laying out)
would fill the screen before training starts.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import datasets
from transformers.trainer_callback import ProgressCallback


class TrainingProgressCallback(ProgressCallback):
    """`ProgressCallback` without the nested evaluation bar during training, except on a terminal."""

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any) -> None:
        if self.training_bar is None or sys.stderr.isatty():
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


# Data preparation steps over fewer rows than this finish in about a second: their bars (four per
# task: loading, validating, tokenizing, laying out) would only fill the screen.
SMALL_DATA_ROWS = 10_000
# The same for loading a file, by its size (a 10 MB jsonl is roughly 10,000 chat records).
SMALL_DATA_BYTES = 10 * 2**20


def use_training_progress_bar(trainer: Any) -> None:
    """Replace the Trainer's default `ProgressCallback` (not a user's own subclass) by
    `TrainingProgressCallback`."""
    if any(type(callback) is ProgressCallback for callback in trainer.callback_handler.callbacks):
        trainer.pop_callback(ProgressCallback)
        trainer.add_callback(TrainingProgressCallback)


@contextlib.contextmanager
def data_progress_bars(shown: bool) -> Iterator[None]:
    """`datasets`' progress bars on (as they were) or off for the steps inside, e.g.
    ``with data_progress_bars(len(raw) >= SMALL_DATA_ROWS): raw.map(...)``; a user who turned them
    off (`datasets.disable_progress_bars()`) keeps them off."""
    was_enabled = datasets.is_progress_bar_enabled()
    if shown or not was_enabled:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
