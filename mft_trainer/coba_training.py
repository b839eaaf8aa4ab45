"""CoBa during training (`weighted_loss_mode: coba`, docs/coba.md): the Trainer callback that measures
the per-task validation losses and gives the loss the balancer's task weights.

mft_trainer/coba.py holds the math (`CoBaBalancer`), mft_trainer/coba_validation.py the validation walk (`ValidationStream`);
this module runs them at the Trainer's step boundaries. At train begin it measures L_i(0) over the
whole validation set (unless a checkpoint restored it); after every `coba_update_interval`
optimizer steps, before that step's logging and checkpoint, it measures `coba_sample_valid_num`
validation batches and lets the balancer update the weights, so that checkpoint-N holds the
weights of step N + 1. Every rank measures its share and the sums are reduced, so the balancer's
state is the same, to the bit, on every rank.

It knows nothing of the trainer: it is handed the tasks, the settings, the accelerator and three
callables (the validation set, the loss measure of a batch of its rows, and the logger):

>>> coba = CoBaCallback(tasks, args, trainer.accelerator, validation_set=lambda: trainer.eval_dataset,
...                     measure=loss_sums_of_rows, log=trainer.log)               # doctest: +SKIP
>>> trainer.add_callback(coba)                                                    # doctest: +SKIP
>>> coba.loss_weights       # [T] task weights of the next steps' case3 reduction  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast
from transformers import TrainerCallback

from .coba import CoBaBalancer
from .coba_validation import ValidationStream
from .constants import IGNORE_INDEX
from .losses import task_loss_metrics
from .modes import CoBaValidSampling
from .run_artifacts import COBA_STATE_FILE, read_coba_state, write_coba_state
from .tasks import TaskRegistry

logger = logging.getLogger(__name__)

# The per-task validation loss sums and trained tokens (``[2, T]``, float64) of one batch of rows.
Measure = Callable[[Sequence[Mapping[str, Any]]], torch.Tensor]


def check_validation_set(eval_dataset: Any) -> None:
    """Raise ValueError, saying what to do, unless `eval_dataset` is one non-empty map-style set."""
    if eval_dataset is None:
        raise ValueError(
            "weighted_loss_mode 'coba' needs an eval_dataset: CoBa weights the tasks by the slopes of their "
            "validation losses. Pass eval_dataset=data.valid (build_mft_dataset with a data_split that keeps a "
            "validation part, e.g. '95,5', or valid_data_paths), or use weighted_loss_mode 'case3'"
        )
    map_style = hasattr(eval_dataset, "__len__") and hasattr(eval_dataset, "__getitem__")
    if isinstance(eval_dataset, dict) or not map_style:
        raise ValueError(
            "weighted_loss_mode 'coba' needs one map-style eval_dataset (with len and indexing, like "
            f"build_mft_dataset(...).valid), got {type(eval_dataset).__name__}"
        )
    if len(eval_dataset) == 0:
        raise ValueError("weighted_loss_mode 'coba' needs validation samples, but eval_dataset is empty")


def row_tasks(dataset: Any) -> list[int]:
    """The task of each row of an evaluation set, for task-balanced CoBa draws: a sample's task, or
    for a packed row (several samples) the task with the most trained tokens in it (the lowest id on
    ties)."""
    if "task_id" in dataset.column_names:
        return [int(t) for t in dataset["task_id"]]
    tasks = []
    for row in dataset.select_columns(["task_ids", "labels"]).with_format("numpy"):
        trained = (row["labels"] != IGNORE_INDEX) & (row["task_ids"] >= 0)  # [L]
        counts = np.bincount(row["task_ids"][trained], minlength=1)
        tasks.append(int(counts.argmax()))
    return tasks


class CoBaCallback(TrainerCallback):
    """Runs the CoBa balancer during training and holds the task weights the loss uses.

    Args:
        tasks: the run's task registry; its weights are the weights until CoBa's first update.
        args: the `MFTConfig` (the coba_* settings, per_device_eval_batch_size, seed, device).
        accelerator: the trainer's (ranks, and the reduction of the measured sums over them).
        validation_set: returns the rows to draw from: the trainer's eval set as its evaluation reads
            it. Called now, to check it, and at the first train begin, whose set is kept.
        measure: the loss sums of one batch of those rows, as `Measure`: a forward without gradient,
            in eval mode, that leaves the model's training mode as it was.
        log: the trainer's `log`, for L_i(0) at train begin.

    Raises:
        ValueError: the eval set is missing, empty, or not one map-style set.
    """

    def __init__(
        self,
        tasks: TaskRegistry,
        args: Any,
        accelerator: Any,
        validation_set: Callable[[], Any],
        measure: Measure,
        log: Callable[[dict[str, float]], None],
    ):
        check_validation_set(validation_set())
        self.tasks, self.args, self.accelerator = tasks, args, accelerator
        self._read_validation_set, self._measure, self._log = validation_set, measure, log
        self.balancer = CoBaBalancer(
            len(tasks),
            initial_weights=tasks.weights,
            warmup_steps=args.coba_warmup_steps,
            history_length=args.coba_history_length,
            tau=args.coba_tau,
            update_interval=args.coba_update_interval,
        )
        self.configured_weights = torch.tensor(tasks.weights, dtype=torch.float32)  # [T]
        self.loss_weights = self.configured_weights  # [T], float32: the weights of the next steps
        self.validation_set: Any = None  # the rows drawn from, read at the first train begin
        self.stream: ValidationStream | None = None
        self._log_sums: torch.Tensor | None = None  # [2, T]: validation loss sums, tokens (logging window)

    def _sync_loss_weights(self) -> None:
        # Until CoBa's first update the configured task weights themselves, so that a coba run is
        # exactly case3 during warmup.
        self.loss_weights = self.configured_weights if self.balancer.num_updates == 0 else self.balancer.weights.float()

    # ---- state -----------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write the balancer's state (`coba_state.json`) into a checkpoint or output directory."""
        write_coba_state(directory, self.balancer.state_dict())

    def restore(self, checkpoint: str | None) -> None:
        """Load the balancer's state from `checkpoint`, or reset it (L_i(0) is then measured at train
        begin, on the model training starts from)."""
        self.balancer.reset()
        self._log_sums = None
        if checkpoint is not None:
            state = read_coba_state(checkpoint)
            if state is not None:
                self.balancer.load_state_dict(state)
            else:
                logger.warning(
                    "%s has no %s (not saved by a coba run): CoBa starts afresh, measuring the initial "
                    "validation losses on the resumed model", checkpoint, COBA_STATE_FILE,
                )
        self._sync_loss_weights()

    # ---- measuring -------------------------------------------------------------------------------

    def validation_losses(self, batches: list[list[int]]) -> torch.Tensor:
        """Per-task validation loss sums and trained tokens over `batches` (rows of the validation
        set; an empty batch runs one row and counts nothing, since sharded models need every rank in
        every forward), summed over ranks.

        Returns:
            ``[2, T]`` float64 on every rank the same: token loss sums, trained tokens.
        """
        totals = torch.zeros(2, len(self.tasks), dtype=torch.float64, device=self.args.device)
        for rows in batches:
            sums = self._measure([self.validation_set[i] for i in rows or [0]])  # [2, T]
            if rows:
                totals += sums
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
            # The balancer's state must be identical on every rank: take rank 0's bits rather than rely
            # on every backend's all-reduce giving the same last bit everywhere.
            totals = broadcast(totals, from_process=0)
        return totals

    def _start_stream(self) -> ValidationStream:
        if self.stream is None:
            self.validation_set = self._read_validation_set()
            uniform = self.args.coba_valid_sampling == CoBaValidSampling.UNIFORM.value
            self.stream = ValidationStream(
                size=len(self.validation_set),
                batch_size=self.args.per_device_eval_batch_size,
                num_ranks=self.accelerator.num_processes,
                rank=self.accelerator.process_index,
                seed=self.args.seed,
                row_tasks=row_tasks(self.validation_set) if uniform else None,
            )
        return self.stream

    # ---- the Trainer's events --------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """L_i(0): the per-task validation losses of the model training starts from."""
        stream = self._start_stream()
        if self.balancer.initial_losses is not None:  # restored from the checkpoint
            return
        totals = self.validation_losses(stream.full_pass())  # [2, T]
        missing = [name for task_id, name in enumerate(self.tasks.names) if totals[1, task_id] == 0]
        if missing:
            raise ValueError(
                f"weighted_loss_mode 'coba' needs validation samples of every task, but task(s) {missing} have no "
                "trained token in eval_dataset; give them a validation part (a larger data_split validation "
                "share or valid_data_paths) or remove them"
            )
        initial = totals[0] / totals[1]
        self.balancer.set_initial_losses(initial.cpu())
        self._sync_loss_weights()
        self._log(task_loss_metrics(totals[0], totals[1], self.tasks.names, "coba_valid_loss"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A validation sample (and a weight update when due) after optimizer step `state.global_step`."""
        step = state.global_step
        if not self.balancer.should_sample(step):
            return
        stream = self._start_stream()
        draws_per_sample = self.args.coba_sample_valid_num
        first_draw = self.balancer.num_samples * draws_per_sample  # draws continue where the last sample ended
        totals = self.validation_losses([stream.draw(k) for k in range(first_draw, first_draw + draws_per_sample)])
        # Token mean over the sample's batches and ranks; NaN (missing) for a task absent from all of them.
        losses = torch.where(totals[1] > 0, totals[0] / totals[1].clamp(min=1), torch.nan).cpu()  # [T]
        self.balancer.record(step, losses)
        self._sync_loss_weights()
        self._log_sums = totals if self._log_sums is None else self._log_sums + totals

    def add_logs(self, logs: dict[str, float]) -> None:
        """Add `coba_weight/<task>` and `coba_valid_loss/<task>` (over the logging window) to a training
        log; identical on all ranks."""
        weights = self.balancer.weights
        logs.update({f"coba_weight/{name}": weights[task_id].item() for task_id, name in enumerate(self.tasks.names)})
        if self._log_sums is not None:
            logs.update(task_loss_metrics(self._log_sums[0], self._log_sums[1], self.tasks.names, "coba_valid_loss"))
        self._log_sums = None
