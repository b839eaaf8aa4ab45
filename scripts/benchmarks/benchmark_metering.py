"""Measuring inside a training row: the step clock and token counts (`StepMeter`), and the
trainers that feed it (`MeteredMFTTrainer`, `MeteredSFTTrainer`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
from transformers import TrainerCallback

from mft_trainer import MFTTrainer

try:  # TRL is optional: without it there is no metered SFTTrainer, and the TRL rows say so
    from trl import SFTTrainer
except ImportError:  # pragma: no cover - depends on the environment
    SFTTrainer = None


class StepMeter(TrainerCallback):
    """Times optimizer steps after `warmup` and counts the tokens each step trained on.

    Tokens are counted on the CPU when the training dataloader collates a micro-batch
    (`record_batch`): real tokens are the tokens of the features (samples or packed rows hold no
    padding), padded tokens the batch's `input_ids` size, trained tokens its labels != -100. The
    training loop runs micro-batches in the order they were collated (a look-ahead only queues them),
    so each `training_step` takes the oldest count. At the end of warmup the meter synchronises CUDA,
    resets the peak-memory counter and starts the clock; every later step end is synchronised too.
    """

    def __init__(self, warmup: int, device: torch.device):
        self.warmup = warmup
        self.device = device
        self.collated: deque[tuple[int, int, int]] = deque()  # (real, padded, trained) per micro-batch
        self.current = [0, 0, 0]
        self.steps: list[tuple[int, int, int]] = []  # per optimizer step, warmup included
        self.durations: list[float] = []  # seconds of each timed step
        self.peak_bytes: int | None = None
        self._last = 0.0

    def record_batch(self, features: list[dict[str, Any]], batch: dict[str, Any]) -> None:
        """Queue the (real, padded, trained) token counts of a micro-batch just collated."""
        real = sum(len(f["input_ids"]) for f in features)
        self.collated.append((real, batch["input_ids"].numel(), int((batch["labels"] != -100).sum())))

    def start_micro_batch(self) -> None:
        """Add the oldest collated micro-batch's counts to the current optimizer step."""
        for k, value in enumerate(self.collated.popleft()):
            self.current[k] += value

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the optimizer step: keep its counts, and time it when it comes after warmup."""
        self.steps.append(tuple(self.current))
        self.current = [0, 0, 0]
        self._synchronize()
        now = time.perf_counter()
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if state.global_step > self.warmup:
            self.durations.append(now - self._last)
            if self.device.type == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated()  # since the end of warmup
        self._last = now


class _CountingCollator:
    """The trainer's collator, telling the meter what each training micro-batch holds."""

    def __init__(self, collate: Any, meter: StepMeter):
        self.collate = collate
        self.meter = meter

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        self.meter.record_batch(features, batch)
        return batch


class _Metered:
    """Trainer mixin: counts the tokens of training micro-batches (evaluation and CoBa's validation
    batches are not counted: only the training dataloader gets the counting collator)."""

    meter: StepMeter

    def get_train_dataloader(self) -> Any:
        """The training dataloader, built with the counting collator."""
        collate = self.data_collator
        self.data_collator = _CountingCollator(collate, self.meter)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One micro-batch, counted into the meter's current step."""
        self.meter.start_micro_batch()
        return super().training_step(*args, **kwargs)


class MeteredMFTTrainer(_Metered, MFTTrainer):
    """MFTTrainer counting its training micro-batches into `meter`."""


if SFTTrainer is not None:

    class MeteredSFTTrainer(_Metered, SFTTrainer):
        """TRL's SFTTrainer counting its training micro-batches into `meter`."""

else:  # pragma: no cover - depends on the environment
    MeteredSFTTrainer = None
