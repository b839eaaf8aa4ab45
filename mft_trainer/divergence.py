"""A diverging or collapsed run: stopped before it damages a checkpoint, or reported.

MFTTrainer's hooks hand `DivergenceGuard` three things to check:

- the loss of every micro-batch (`NonFiniteLossError`);
- the gradient norm of every optimizer step, which the Trainer computes before the step anyway
  (`NonFiniteGradientError`): a finite loss can have a NaN gradient, as with a learning rate far too
  high, and the optimizer would write it into every weight;
- the trainable weights before every checkpoint and at the end of training
  (`NonFiniteWeightsError`), so that no checkpoint and no final model holds NaN or inf (an update
  can overflow with a finite gradient, and DeepSpeed steps inside the backward pass).

A run that collapses without a NaN is reported instead: a gradient of exactly 0 at a step that has
trained tokens means that the model no longer learns (with a huge learning rate, the activations
overflow, the normalisation layers give 0, every token gets the same probability, and the loss sits
at ln(vocab size)).

>>> guard = DivergenceGuard(args, trainer.accelerator, deepspeed=trainer.is_deepspeed_enabled)  # doctest: +SKIP
>>> guard.check_loss(loss, step=3)     # NonFiniteLossError, saying what was kept, if it is NaN or inf  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)

# What helps against a diverging run, appended to every message.
REMEDY = "Lower learning_rate (or use more warmup_steps), use bf16 instead of fp16, or set max_grad_norm"


class NonFiniteError(RuntimeError):
    """Training produced NaN or infinite values; the message says where, and what was kept intact."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


class NonFiniteGradientError(NonFiniteError):
    """The gradient of an optimizer step became NaN or infinite (its loss may well be finite)."""


class NonFiniteWeightsError(NonFiniteError):
    """Trainable weights became NaN or infinite; they are not saved."""


def as_float(value: Any) -> float | None:
    """A gradient norm as the Trainer returns it (float, tensor, DTensor, or None) as a float."""
    if value is None:
        return None
    if hasattr(value, "full_tensor"):  # an FSDP2 DTensor: the norm over all shards
        value = value.full_tensor()
    return float(value.item() if hasattr(value, "item") else value)


def _local_values(parameter: torch.Tensor) -> torch.Tensor:
    """The values of `parameter` this rank holds: DeepSpeed ZeRO-3 keeps them in `ds_tensor` (the
    parameter itself is empty), FSDP2 in the DTensor's local shard."""
    if getattr(parameter, "ds_tensor", None) is not None:
        return parameter.ds_tensor
    if hasattr(parameter, "to_local"):
        return parameter.to_local()
    return parameter


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters with a NaN or infinite value in this rank's part of them."""
    named = [(name, _local_values(p).detach()) for name, p in model.named_parameters() if p.requires_grad]
    named = [(name, values) for name, values in named if values.numel() > 0]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(values).all().to(named[0][1].device) for _, values in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def uniform_loss_text(model: nn.Module) -> str:
    """' (ln(vocab size) = X: every token equally likely)', from the model's config, or ''."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        return ""
    return f"ln(vocab size {vocab_size}) = {math.log(vocab_size):.4f}, the loss of a model that gives every token the same probability"


class DivergenceGuard:
    """The checks of one run, called from the trainer's hooks with the optimizer step they are at.

    Args:
        args: the run's TrainingArguments (output_dir: where the last good checkpoint is looked for).
        accelerator: the trainer's (ranks, main process, unwrapping the model).
        deepspeed: DeepSpeed runs the optimizer step inside the backward pass (the stop message says
            so).
    """

    def __init__(self, args: Any, accelerator: Any, deepspeed: bool = False):
        self.args, self.accelerator, self.deepspeed = args, accelerator, deepspeed
        self.steps_checked = 0  # optimizer steps of this train() call whose gradient was checked
        self.zero_gradient_steps: list[int] = []  # those with a gradient of exactly 0 and trained tokens

    def start(self) -> None:
        """Forget the steps of an earlier train() call."""
        self.steps_checked, self.zero_gradient_steps = 0, []

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        """Raise NonFiniteLossError if the micro-batch loss of optimizer step `step` is NaN or inf."""
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(f"the loss is {loss.item()} at optimizer step {step}: {self._stop_report()}")

    def check_gradient_norm(
        self, grad_norm: Any, step: int, model: nn.Module, trained_tokens: Callable[[], int]
    ) -> None:
        """Raise NonFiniteGradientError for a NaN or infinite gradient norm (before the optimizer
        applies it); record a norm of exactly 0 at a step with `trained_tokens()` > 0 (tokens of
        tasks with a weight), and warn at the first: a collapsed run would otherwise end without a
        word. Reads the norm as a number: one host-device synchronisation per optimizer step."""
        norm = as_float(grad_norm)
        if norm is None:
            return
        self.steps_checked += 1
        if not math.isfinite(norm):
            raise NonFiniteGradientError(
                f"the gradient norm is {norm} at optimizer step {step} (its loss is finite): {self._stop_report()}"
            )
        if norm != 0.0:
            return
        tokens = trained_tokens()
        if tokens == 0:
            return  # nothing to learn from in this step: a zero gradient is right
        self.zero_gradient_steps.append(step)
        if len(self.zero_gradient_steps) == 1 and self.accelerator.is_main_process:
            uniform = uniform_loss_text(self.accelerator.unwrap_model(model))
            logger.warning(
                "optimizer step %d: the gradient is exactly 0 although the step trains %d tokens, so the model no "
                "longer learns. A learning rate far too high does this (the activations overflow and the loss stays "
                "at %s); so do trainable weights that the loss does not reach. Lower learning_rate and start again "
                "from an earlier checkpoint.", step, tokens, uniform or "ln(vocab size)",
            )

    def check_weights(self, model: nn.Module, when: str, not_saved: str) -> None:
        """Raise NonFiniteWeightsError if a trainable weight is NaN or infinite on any rank (every rank
        calls this: it reduces over them)."""
        names = non_finite_parameters(model)
        count = len(names)
        if self.accelerator.num_processes > 1:
            count = int(self.accelerator.reduce(torch.tensor(count, device=self.args.device), reduction="sum"))
        if count:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "on another rank"
            raise NonFiniteWeightsError(
                f"the trainable weights {when} are not finite ({shown}): {not_saved}; "
                f"{self._last_checkpoint_text()}. {REMEDY}."
            )

    def warn_if_collapsed(self, model: nn.Module, training_loss: float) -> None:
        """Repeat, at the end of training, that steps had a gradient of exactly 0."""
        steps = self.zero_gradient_steps
        if steps and self.accelerator.is_main_process:
            uniform = uniform_loss_text(self.accelerator.unwrap_model(model))
            logger.warning(
                "training collapsed: %d of the %d optimizer steps had a gradient of exactly 0 (the first: step %d), "
                "so the model learnt nothing from them; train_loss %.4f%s. Lower learning_rate.",
                len(steps), self.steps_checked, steps[0], training_loss, f" ({uniform})" if uniform else "",
            )

    def _stop_report(self) -> str:
        """What stopping at a non-finite loss or gradient leaves behind, and what to do."""
        if self.deepspeed:
            applied = (
                "training stopped; DeepSpeed runs the optimizer step inside the backward pass, so the weights in "
                "memory may hold it, but nothing was saved after it"
            )
        else:
            applied = "training stopped before the optimizer applied it"
        return f"{applied}; {self._last_checkpoint_text()}. {REMEDY}."

    def _last_checkpoint_text(self) -> str:
        last = last_complete_checkpoint(self.args.output_dir)
        if last is None:
            return "no checkpoint has been saved yet"
        return f"the last checkpoint, {last}, holds finite weights (resume_from_checkpoint continues from it)"
