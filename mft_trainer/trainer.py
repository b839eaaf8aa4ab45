"""`MFTTrainer`: `transformers.Trainer` with per-task weighted losses that are exact across gradient
accumulation and data-parallel ranks.

>>> data = build_mft_dataset(DataConfig(data_paths=[...]), tokenizer)            # doctest: +SKIP
>>> trainer = MFTTrainer(model=model, args=MFTConfig(output_dir="out", weighted_loss_mode="case3"),
...                      train_dataset=data.train, eval_dataset=data.valid,
...                      processing_class=tokenizer, tasks=data.tasks)
>>> trainer.train()        # logs loss and loss/<task>; evaluate() gives eval_loss and eval_loss/<task>

How the loss stays exact (DESIGN.md invariant 2): before the micro-batches of an optimizer step run,
`get_batch_samples` counts the trained tokens and samples of every task over the whole accumulation
window and sums them over the ranks. Each micro-batch then contributes its per-task loss sums
divided by those step-wide counts, so the contributions add up to the loss of the whole step as if
it were one batch. Data-parallel backends average gradients over ranks, so each rank's contribution
is multiplied by the number of ranks; the Trainer must not divide it again by the accumulation steps
(`loss_is_scaled_for_ga = True`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from .collator import DataCollatorForMFT
from .config import MFTConfig
from .losses import (
    LossMode,
    LossNormalizers,
    combine_task_sums,
    count_normalizers,
    per_token_cross_entropy,
    task_loss_sums,
)
from .tasks import TaskRegistry

# Dataset columns the collator needs; the Trainer would otherwise drop those the model's forward
# does not name (task_id above all).
DATASET_COLUMNS = ["input_ids", "labels", "task_id", "task_ids", "segment_ids", "position_ids", "attention_mask"]
# Batch keys that feed the loss and never reach the model's forward.
LOSS_KEYS = ("labels", "task_ids", "segment_ids")


class MFTTrainer(Trainer):
    """A `Trainer` whose loss is the configured multi-task reduction of per-token cross-entropy.

    Args:
        model: any `AutoModelForCausalLM` (or a PEFT model wrapping one).
        args: an `MFTConfig`.
        tasks: the `TaskRegistry` of the data (`build_mft_dataset(...).tasks`); task weights of
            `args.task_weights` are applied to it.
        data_collator: defaults to `DataCollatorForMFT` padding with the tokenizer's pad token (its
            EOS token when it has none).
        Everything else as `transformers.Trainer`.

    Metrics: training logs add `loss/<task>` (token-mean cross-entropy of each task over the logging
    window, all ranks); evaluation gives `eval_loss` (the configured mode, computed over the whole
    evaluation set) and `eval_loss/<task>`, usable as `metric_for_best_model`.
    """

    # compute_loss normalises by the counts of the whole optimizer step (see the module docstring).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        tasks: TaskRegistry | None = None,
        **kwargs: Any,
    ):
        if tasks is None:
            raise ValueError("MFTTrainer needs tasks=<TaskRegistry>: pass the .tasks of build_mft_dataset(...)")
        if args is None:
            args = MFTConfig(output_dir="mft_output")
        if not isinstance(args, MFTConfig):
            raise TypeError(f"MFTTrainer needs args=MFTConfig(...), got {type(args).__name__}")
        if data_collator is None:
            data_collator = DataCollatorForMFT(pad_token_id=_pad_token_id(processing_class))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The model gets no labels and computes no loss, so the Trainer's own token counting is moot.
        self.model_accepts_loss_kwargs = False
        self.tasks = tasks.with_weights(args.task_weights) if args.task_weights else tasks
        self.loss_mode = LossMode.parse(args.weighted_loss_mode)
        self._task_weights = torch.tensor(self.tasks.weights, dtype=torch.float32)
        self._step_normalizers: LossNormalizers | None = None
        self._micro_batches_in_step = 1
        self._train_sums: torch.Tensor | None = None  # [2, T]: token loss sums, trained tokens (logging window)
        self._eval_sums: torch.Tensor | None = None  # [4, T]: token loss sums, sample-mean sums, tokens, samples

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(DATASET_COLUMNS)

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """Fetch the micro-batches of one optimizer step and count the step's loss normalisers."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = count_normalizers(batch_samples, self.num_tasks, device=device).stacked()  # [2, T]
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._step_normalizers = LossNormalizers.from_stacked(counts)
        self._micro_batches_in_step = max(len(batch_samples), 1)
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        missing = [key for key in LOSS_KEYS if key not in inputs]
        if missing:
            raise ValueError(
                f"the batch has no {missing}: MFTTrainer needs batches from DataCollatorForMFT (the default "
                "collator) over rows of build_mft_dataset"
            )
        inputs = dict(inputs)
        labels, task_ids, segment_ids = (inputs.pop(key) for key in LOSS_KEYS)
        outputs = model(**inputs, use_cache=False)
        per_token = per_token_cross_entropy(outputs.logits, labels)  # [B, L]
        sums = task_loss_sums(per_token, labels, task_ids, segment_ids, self.num_tasks)  # [2, T]
        batch_counts = count_normalizers(
            [{"labels": labels, "task_ids": task_ids, "segment_ids": segment_ids}], self.num_tasks
        )
        weights = self._task_weights.to(per_token.device)

        if model.training:
            normalizers = self._step_normalizers if self._step_normalizers is not None else batch_counts
            loss = combine_task_sums(sums, self.loss_mode, normalizers, weights)
            # Data-parallel backends average gradients over ranks; the step loss is their sum.
            loss = loss * self.accelerator.num_processes
            self._add_train_sums(torch.stack([sums[0].detach().float(), batch_counts.tokens_per_task]))
        else:
            loss = combine_task_sums(sums, self.loss_mode, batch_counts, weights)
            self._add_eval_sums(torch.cat([sums.detach().float(), batch_counts.stacked()]))

        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:
            # Mixture-of-experts load balancing, as transformers adds it to the model's own loss; one
            # micro-batch's share of the step's mean.
            coefficient = getattr(self.accelerator.unwrap_model(model).config, "router_aux_loss_coef", 0.0)
            share = self._micro_batches_in_step if model.training else 1
            loss = loss + coefficient * aux_loss.to(loss.device) / share
        return (loss, outputs) if return_outputs else loss

    def _add_train_sums(self, sums: torch.Tensor) -> None:
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums

    def _add_eval_sums(self, sums: torch.Tensor) -> None:
        if self._eval_sums is not None:
            self._eval_sums = self._eval_sums + sums

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `loss/<task>` to training logs (every rank calls this, so the reduce is safe)."""
        if "loss" in logs:
            sums = self._train_sums
            if sums is None:
                sums = torch.zeros(2, self.num_tasks, device=self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
            for task_id, name in enumerate(self.tasks.names):
                if sums[1, task_id] > 0:
                    logs[f"loss/{name}"] = (sums[0, task_id] / sums[1, task_id]).item()
            self._train_sums = None
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Run the Trainer's loop, then replace its mean of batch losses by the exact loss of the
        configured mode over the whole set, and add the per-task losses."""
        self._eval_sums = torch.zeros(4, self.num_tasks, device=self.args.device)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            sums = self._eval_sums
        finally:
            self._eval_sums = None
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        if sums[2].sum() > 0:
            counts = LossNormalizers.from_stacked(sums[2:])
            loss = combine_task_sums(sums[:2], self.loss_mode, counts, self._task_weights.to(sums.device))
            output.metrics[f"{metric_key_prefix}_loss"] = loss.item()
            for task_id, name in enumerate(self.tasks.names):
                if sums[2, task_id] > 0:
                    output.metrics[f"{metric_key_prefix}_loss/{name}"] = (sums[0, task_id] / sums[2, task_id]).item()
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does, plus the task registry (`tasks.json`) beside the model."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.tasks.save(output_dir or self.args.output_dir)


def _pad_token_id(tokenizer: Any) -> int:
    if tokenizer is None:
        raise ValueError("pass processing_class=<tokenizer> (or a data_collator) so that batches can be padded")
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)  # padding is masked out, so EOS serves (as in MFTCoder)
    raise ValueError("the tokenizer has neither a pad nor an EOS token; pass a data_collator with a pad_token_id")
