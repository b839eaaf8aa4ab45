"""`MFTTrainer`: `transformers.Trainer` with per-task weighted losses that are exact across gradient
accumulation and data-parallel ranks.

>>> data = build_mft_dataset(DataConfig(data_paths=[...]), tokenizer)            # doctest: +SKIP
>>> trainer = MFTTrainer(model=model, args=MFTConfig(output_dir="out", weighted_loss_mode="case3"),
...                      data=data, processing_class=tokenizer)                   # doctest: +SKIP
>>> trainer.train()        # logs loss and loss/<task>; evaluate() gives eval_loss and eval_loss/<task>

How the loss stays exact (DESIGN.md invariant 2): before the micro-batches of an optimizer step run,
`get_batch_samples` counts the trained tokens and samples of every task over the whole accumulation
window and sums them over the ranks. Each micro-batch then contributes its per-task loss sums
divided by those step-wide counts, so the contributions add up to the loss of the whole step as if
it were one batch. Data-parallel backends average gradients over ranks, so each rank's contribution
is multiplied by the number of ranks; the Trainer must not divide it again by the accumulation steps
(`loss_is_scaled_for_ga = True`).

The trainer keeps the hooks; what they call lives beside it: the CoBa callback, whose weights feed
the case3 reduction with `weighted_loss_mode: coba` (coba_training.py), the plain-or-chunked
per-token loss (chunked_loss.py), the packing-leak check (packing_guard.py), the stop at a diverging
run (divergence.py), complete checkpoints only to resume from (checkpoints.py), evaluation
placeholders for several ranks (eval_padding.py) and the files saved with the model
(run_artifacts.py). What remains (about 460 lines, a quarter of them documentation) is the Trainer
overrides, which have to be methods of the subclass.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch
from torch import nn
from transformers import EarlyStoppingCallback, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, TrainOutput

from .checkpoints import checkpoint_to_resume, reporting_save_failures
from .chunked_loss import OutputHeadLoss, choose_output_head_loss, forward_per_token_loss
from .coba_training import CoBaCallback
from .collator import DataCollatorForMFT, rows_padding_mode
from .config import MFTConfig
from .dataset import MFTDataset
from .divergence import DivergenceGuard
from .eval_padding import pad_eval_set_for_ranks, real_length
from .losses import (
    LossNormalizers,
    combine_task_sums,
    count_normalizers,
    evaluation_loss_metrics,
    loss_coefficients,
    loss_dtype,
    split_loss_targets,
    task_loss_metrics,
    task_loss_sums,
)
from .modeling import keep_4bit_weights_trainable
from .modes import LossMode
from .packing_guard import PackingGuard
from .progress import use_training_progress_bar
from .segments import padding_token_id
from .run_artifacts import copy_run_artifacts, save_run_artifacts
from .tasks import TaskRegistry

# Dataset columns the collator needs; the Trainer would otherwise drop those the model's forward
# does not name (task_id above all).
DATASET_COLUMNS = ["input_ids", "labels", "task_id", "task_ids", "segment_ids", "position_ids", "attention_mask"]


class MFTTrainer(Trainer):
    """A `Trainer` whose loss is the configured multi-task reduction of per-token cross-entropy.

    Args:
        model: any `AutoModelForCausalLM` (or a PEFT model wrapping one).
        args: an `MFTConfig`.
        data: the `MFTDataset` of `build_mft_dataset(...)`: the train and eval datasets, tasks and
            default collator that are not given, and the data settings of the saved run config (so
            that chat.py prompts the model in the format it was trained in).
        tasks: the `TaskRegistry` of the data (`build_mft_dataset(...).tasks`); task weights of
            `args.task_weights` are applied to it.
        data_collator: defaults to `DataCollatorForMFT` padding with the tokenizer's pad token (its
            EOS token when it has none), in the padding mode of `data`, else of the rows
            (`collator.rows_padding_mode`).
        run_config: the run's resolved settings (scripts/train.py passes its recipe), saved as
            `run_config.yaml` with the model and every checkpoint (mft_trainer.run_artifacts);
            default: the data settings and summary of `data` and the training arguments.
        Everything else as `transformers.Trainer`.

    Metrics: training logs add `loss/<task>` (token-mean cross-entropy of each task over the logging
    window, all ranks); evaluation gives `eval_loss` (the configured mode, computed over the whole
    evaluation set) and `eval_loss/<task>`, usable as `metric_for_best_model`. With coba, training
    logs also carry `coba_weight/<task>` (the weights of the next steps) and `coba_valid_loss/<task>`
    (the validation loss CoBa measured over the logging window), and `eval_loss` uses the configured
    task weights, so that it stays comparable from one evaluation to the next.

    Raises:
        ValueError: coba without an `eval_dataset` (CoBa needs validation samples of every task).
        NonFiniteLossError, NonFiniteGradientError, NonFiniteWeightsError (from `train`): the run
            diverged; nothing non-finite was saved.
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
        run_config: dict[str, Any] | None = None,
        data: MFTDataset | None = None,
        **kwargs: Any,
    ):
        if data is not None:
            train_dataset = data.train if train_dataset is None else train_dataset
            eval_dataset = data.valid if eval_dataset is None else eval_dataset
            tasks = data.tasks if tasks is None else tasks
        if tasks is None:
            raise ValueError(
                "MFTTrainer needs tasks=<TaskRegistry>: pass data=build_mft_dataset(...), or its .tasks as tasks"
            )
        if args is None:
            args = MFTConfig(output_dir="mft_output")
        if not isinstance(args, MFTConfig):
            raise TypeError(f"MFTTrainer needs args=MFTConfig(...), got {type(args).__name__}")
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class=<tokenizer> (or a data_collator) so that batches can be padded")
            rows = train_dataset if train_dataset is not None else eval_dataset
            padding_mode = data.padding_mode if data is not None else rows_padding_mode(rows)
            data_collator = DataCollatorForMFT(padding_token_id(processing_class), padding_mode=padding_mode)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        use_training_progress_bar(self)
        # The model gets no labels and computes no loss, so the Trainer's own token counting is moot.
        self.model_accepts_loss_kwargs = False
        # Evaluation (and the first step's probe) must not switch 4-bit layers to an inference format.
        keep_4bit_weights_trainable(self.model)
        # Refuses a model/backend that would let packed samples attend to each other (invariant 3).
        self.packing = PackingGuard(self.model, self.data_collator)
        if args.early_stopping_patience is not None:
            self.add_callback(EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold))
        self.tasks = tasks.with_weights(args.task_weights) if args.task_weights else tasks
        self.run_config = run_config
        self.data = data
        self.loss_mode = LossMode.parse(args.weighted_loss_mode)
        self._task_weights = torch.tensor(self.tasks.weights, dtype=torch.float32)
        self._step_normalizers: LossNormalizers | None = None
        self._micro_batches_in_step = 1
        self._train_sums: torch.Tensor | None = None  # [2, T]: token loss sums, trained tokens (logging window)
        self._eval_sums: torch.Tensor | None = None  # [4, T]: token loss sums, sample-mean sums, tokens, samples
        self._head_loss: OutputHeadLoss | None = None
        self._head_loss_resolved = False
        self._logits_wanted = False  # set by prediction_step when the caller needs real logits
        self.divergence = DivergenceGuard(args, self.accelerator, deepspeed=self.is_deepspeed_enabled)
        self.coba: CoBaCallback | None = None
        if self.loss_mode is LossMode.COBA:
            self.coba = CoBaCallback(self.tasks, args, self.accelerator, validation_set=self._coba_validation_set,
                                     measure=self._validation_loss_sums, log=self.log)
            self.add_callback(self.coba)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(DATASET_COLUMNS)

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step, stopped at the first non-finite loss: before the optimizer applies its
        gradient, so no checkpoint holds weights it has damaged."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.divergence.check_loss(loss, self.state.global_step + 1)
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm of the step (computed, and clipped to max_grad_norm, before the
        optimizer step): a NaN or infinite one stops training before the optimizer writes it into the
        weights, one of exactly 0 with trained tokens is reported (`DivergenceGuard`)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        step = self.state.global_step + 1
        self.divergence.check_gradient_norm(grad_norm, step, self.model, self._weighted_step_tokens)
        return grad_norm

    def _weighted_step_tokens(self) -> int:
        """Trained tokens of this optimizer step (all ranks) in tasks whose weight is not 0."""
        counts = self._step_normalizers
        if counts is None:
            return 0
        return int((counts.tokens_per_task.cpu() * (self._loss_weights().cpu() > 0)).sum())

    def _loss_weights(self) -> torch.Tensor:
        """``[T]`` task weights of the training loss: CoBa's with coba, else the configured ones."""
        return self._task_weights if self.coba is None else self.coba.loss_weights

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
        targets, inputs = split_loss_targets(inputs)
        self.packing.check(inputs)
        training = model.training
        batch_counts = count_normalizers([targets._asdict()], self.num_tasks)
        # Training divides by the counts of the whole step; evaluation by the batch's, with the configured
        # weights (the loss of the whole set is computed from the sums in evaluation_loop).
        normalizers = self._step_normalizers if training and self._step_normalizers is not None else batch_counts
        weights = self._loss_weights() if training else self._task_weights
        head_loss = None if (return_outputs and self._logits_wanted) else self._output_head_loss(model, inputs)
        coefficients = None
        if head_loss is not None and training and torch.is_grad_enabled():
            # The fused layer computes the gradient of sum(coefficients * per-token loss) in its forward.
            coefficients = loss_coefficients(*targets, self.loss_mode, normalizers, weights.to(targets.labels.device),
                                             dtype=loss_dtype(head_loss.head.weight.dtype))
        outputs, per_token, loss = forward_per_token_loss(model, inputs, targets.labels, head_loss, coefficients)
        sums = task_loss_sums(per_token, *targets, self.num_tasks)  # [2, T]
        if loss is None:  # the plain path: the loss from the sums
            loss = combine_task_sums(sums, self.loss_mode, normalizers, weights.to(per_token.device))
        if training:
            # Data-parallel backends average gradients over ranks; the step loss is their sum.
            loss = loss * self.accelerator.num_processes
            self._add_train_sums(torch.stack([sums[0].detach().float(), batch_counts.tokens_per_task]))
        else:
            self._add_eval_sums(torch.cat([sums.detach().float(), batch_counts.stacked()]))
        loss = self._with_router_aux_loss(loss, outputs, model)
        return (loss, outputs) if return_outputs else loss

    def _with_router_aux_loss(self, loss: torch.Tensor, outputs: Any, model: nn.Module) -> torch.Tensor:
        """`loss` plus a mixture-of-experts model's load-balancing loss, as transformers adds it to the
        model's own loss: one micro-batch's share of the step's mean."""
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is None:
            return loss
        coefficient = getattr(self.accelerator.unwrap_model(model).config, "router_aux_loss_coef", 0.0)
        share = self._micro_batches_in_step if model.training else 1
        return loss + coefficient * aux_loss.to(loss.device) / share

    def _output_head_loss(self, model: nn.Module, inputs: dict[str, Any]) -> OutputHeadLoss | None:
        """The chunked loss for this model, or None for the plain path; chosen at the first call, with
        a probe forward on a few tokens of the first batch (`choose_output_head_loss`)."""
        if not self._head_loss_resolved:
            self._head_loss = choose_output_head_loss(
                model, inputs["input_ids"][:1, :16], self.args.loss_implementation, self.args.loss_chunk_size,
                torch_compile=self.args.torch_compile, unwrapped=self.accelerator.unwrap_model(model),
            )
            self._head_loss_resolved = True
        return self._head_loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The Trainer's step; when its caller wants logits (compute_metrics), the plain loss path
        gives them."""
        self._logits_wanted = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self._logits_wanted = False

    def _add_train_sums(self, sums: torch.Tensor) -> None:
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums

    def _add_eval_sums(self, sums: torch.Tensor) -> None:
        if self._eval_sums is not None:
            self._eval_sums = self._eval_sums + sums

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `loss/<task>` to training logs (every rank calls this, so the reduce is safe)."""
        if "loss" in logs:
            sums = self._train_sums if self._train_sums is not None else torch.zeros(2, self.num_tasks)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
            logs.update(task_loss_metrics(sums[0], sums[1], self.tasks.names, "loss"))
            self._train_sums = None
            if self.coba is not None:
                self.coba.add_logs(logs)
        super().log(logs, start_time)

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> TrainOutput:
        """The Trainer's end of training, with `training_loss` exact and equal on every rank.

        The Trainer adds the loss of the steps since the last logging step from each rank's own
        accumulator, which holds that rank's share of the step losses times the number of ranks
        (see `compute_loss`); their mean over the ranks is the loss of those steps, as at logging."""
        if self.accelerator.num_processes > 1:
            self._tr_loss = self.accelerator.reduce(self._tr_loss, reduction="mean")
        return super()._finalize_training(trial, num_train_samples, start_time)

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
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            sums = self._eval_sums
        finally:
            self._eval_sums = None
        num_samples = real_length(getattr(dataloader, "dataset", None))
        if num_samples is not None:
            output = output._replace(num_samples=num_samples)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        output.metrics.update(
            evaluation_loss_metrics(sums, self.loss_mode, self._task_weights, self.tasks.names, metric_key_prefix)
        )
        return output

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """The Trainer's `model_init` (hyperparameter search), with 4-bit layers kept trainable as in
        `__init__`."""
        model = super().call_model_init(trial)
        keep_4bit_weights_trainable(model)
        self.packing = PackingGuard(model)  # a new model: checked at its first packed batch
        return model

    def _get_dataloader(
        self,
        dataset: Any,
        description: str,
        batch_size: int,
        sampler_fn: Any = None,
        is_training: bool = False,
        dataloader_key: str | None = None,
    ) -> Any:
        """The Trainer's dataloader; for evaluation on several ranks, over the set completed with items
        that carry no loss (`pad_for_even_batches`), so that accelerate has no batch to complete with
        repeated samples, which would count twice in the eval losses."""
        ranks = self.accelerator.num_processes
        if not is_training and ranks > 1 and not self.args.dataloader_drop_last:
            # accelerate's global batch: split_batches divides `batch_size` among the ranks.
            global_batch = batch_size if self.accelerator.split_batches else batch_size * ranks
            dataset, sampler_fn = pad_eval_set_for_ranks(dataset, global_batch, sampler_fn)
        return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does, plus the run artefacts (mft_trainer.run_artifacts): the task
        registry, the run config, the generation config of an adapter, and with coba the balancer's
        state. The Trainer saves every checkpoint through here, before its `trainer_state.json`, so a
        complete checkpoint always has them; with `push_to_hub` the push comes after them, so the Hub
        copy has them too.

        Raises:
            CheckpointSaveError: the save failed; the message names the directory and says whether
                the disk is full.
        """
        output_dir = output_dir or self.args.output_dir
        # Inside a checkpoint, _save_checkpoint reports the failure (as an incomplete checkpoint).
        with contextlib.nullcontext() if _internal_call else reporting_save_failures(output_dir, "model"):
            super().save_model(output_dir, _internal_call=True)  # True: no push before the artefacts exist
            if self.args.should_save:
                save_run_artifacts(output_dir, self.tasks.to_dict(), self._run_config_to_save(),
                                   self.accelerator.unwrap_model(self.model))
                if self.coba is not None:
                    self.coba.save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _run_config_to_save(self) -> dict[str, Any]:
        """The `run_config` given, else what the trainer knows: the settings (whose prompt format
        chat.py and merge_lora.py read) and summary of `data`, and the training arguments."""
        if self.run_config is not None:
            return self.run_config
        return {**(self.data.run_config() if self.data is not None else {}), "training": self.args.to_dict()}

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The Trainer's push of a checkpoint (`hub_strategy`), which copies the checkpoint's model
        files into output_dir and uploads that: the run artefacts are copied too."""
        if self.args.should_save:
            copy_run_artifacts(checkpoint_folder, self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint; a failed save says which checkpoint it left incomplete and why."""
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        step = self.state.global_step
        self.divergence.check_weights(self.model, f"after optimizer step {step}", f"{checkpoint} was not saved")
        with reporting_save_failures(checkpoint, "checkpoint"):
            super()._save_checkpoint(model, trial)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """`Trainer.train`, resumed only from a complete checkpoint (`checkpoints.checkpoint_to_resume`:
        `True` takes the last complete one in output_dir), with coba's state restored from it (or
        started afresh), stopped at the first non-finite loss, gradient or weight and warning of a
        collapse at the end (`divergence.DivergenceGuard`).

        Raises:
            IncompleteCheckpointError: the named checkpoint lacks a file or has a truncated one.
            ValueError: `resume_from_checkpoint=True` and output_dir holds no complete checkpoint.
            NonFiniteLossError, NonFiniteGradientError, NonFiniteWeightsError: the run diverged.
        """
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        if self.coba is not None:
            self.coba.restore(resume_from_checkpoint)
        self.divergence.start()
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        # The caller saves the final model next (scripts/train.py does): not if it is damaged.
        self.divergence.check_weights(self.model, "at the end of training", "training stopped before they were saved")
        self.divergence.warn_if_collapsed(self.model, output.training_loss)
        return output

    # ---- CoBa ------------------------------------------------------------------------------------

    def _coba_validation_set(self) -> Any:
        """The eval set as the Trainer's evaluation reads it (a datasets.Dataset loses the columns
        that evaluation drops): the rows CoBa measures."""
        if isinstance(self.eval_dataset, datasets.Dataset):
            return self._remove_unused_columns(self.eval_dataset, description="CoBa validation")
        return self.eval_dataset

    def _validation_loss_sums(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """CoBa's measure: per-task validation loss sums and trained tokens of one batch of eval rows,
        ``[2, T]`` float64, from a forward without gradient in eval mode (the model as the Trainer's
        evaluation inside training runs it: unwrapped DDP, wrapped FSDP/DeepSpeed)."""
        targets, inputs = split_loss_targets(self._prepare_inputs(self.data_collator(list(rows))))
        self.packing.check(inputs)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            # No gradient and no graph: these forwards are CoBa's only cost.
            head_loss = self._output_head_loss(model, inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                _, per_token, _ = forward_per_token_loss(model, inputs, targets.labels, head_loss)  # [B, L]
        finally:
            model.train(was_training)
        token_sums = task_loss_sums(per_token, *targets, self.num_tasks)[0]  # [T]
        tokens = count_normalizers([targets._asdict()], self.num_tasks).tokens_per_task  # [T]
        return torch.stack([token_sums.double(), tokens.double()])
