"""`MFTConfig`: `transformers.TrainingArguments` plus the multi-task loss fields.

>>> args = MFTConfig(output_dir="out", weighted_loss_mode="case3", task_weights={"code_qa": 2.0})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .losses import LossMode


@dataclass
class MFTConfig(TrainingArguments):
    """Training arguments of an MFT run. Every `TrainingArguments` field works as usual (DeepSpeed,
    FSDP, checkpoints, resume, early stopping, logging); the fields below add the per-task loss.

    Loss:
        weighted_loss_mode: how per-token losses become the loss of a step (DESIGN.md, "Loss modes"):
            `case1` (token mean), `case2` (sample mean), `case3` (task-balanced token mean, default),
            `case4` (task-balanced sample mean); aliases `token`, `sample`, `task`, `task_sample`.
        task_weights: per-task loss weights by task name (default equal), for case3/case4.
    """

    weighted_loss_mode: str = field(
        default="case3",
        metadata={
            "help": "Loss reduction: case1 (token mean), case2 (sample mean), case3 (task-balanced token mean, "
            "the default), case4 (task-balanced sample mean); aliases token, sample, task, task_sample."
        },
    )
    task_weights: Optional[dict] = field(
        default=None,
        metadata={
            "help": 'Per-task loss weights by task name, e.g. {"code_qa": 2.0}; tasks not named weigh 1.0. '
            "Used by case3 and case4."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        mode = LossMode.parse(self.weighted_loss_mode)
        if mode is LossMode.COBA:
            raise ValueError(
                "weighted_loss_mode 'coba' (the self-paced Convergence Balancer) is not available in this "
                "version; use case3 for a task-balanced loss"
            )
        self.weighted_loss_mode = mode.value
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict):
                raise ValueError(f'task_weights must be a mapping task name -> weight, e.g. {{"code_qa": 2.0}}, got {self.task_weights!r}')
            for name, weight in self.task_weights.items():
                if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"task_weights[{name!r}] must be a finite number >= 0, got {weight!r}")
            if mode in (LossMode.CASE1, LossMode.CASE2):
                raise ValueError(
                    f"task_weights are used by the task-balanced modes (case3, case4) only; weighted_loss_mode is "
                    f"{mode.value}"
                )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                "label_smoothing_factor is not supported: MFTTrainer computes its own per-task cross-entropy"
            )
