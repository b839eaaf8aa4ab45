"""A diverging or collapsed run: stopped before it damages a checkpoint, or reported.

MFTTrainer checks three things (mft_trainer/trainer.py):

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
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

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
