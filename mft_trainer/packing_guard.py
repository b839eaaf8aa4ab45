"""The check that a model keeps the samples of a packed row apart (DESIGN.md invariant 3): a probe
forward of two samples packed in one row against each alone, and the guard MFTTrainer runs before
any packed batch trains (mft_trainer/attention.py says how each backend keeps samples apart).

>>> from mft_trainer.packing_guard import PackingGuard, check_packing_support
>>> check_packing_support(model, "pack")  # raises PackingError if samples would leak  # doctest: +SKIP
>>> guard = PackingGuard(model, collator)  # MFTTrainer's: checks now if the collator packs  # doctest: +SKIP
>>> guard.check(batch)                   # else at the first batch that is_packed_batch  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import MASK_BACKENDS, PACKING_BACKENDS, TORCH_VARLEN, PackingError
from .modes import PaddingMode

logger = logging.getLogger(__name__)


def _is_flash(implementation: str) -> bool:
    """flash_attention_2/3/4 and the hub kernels transformers substitutes for them: all take cu_seq_lens."""
    try:
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:  # older transformers
        return implementation.startswith("flash_attention") or "flash-attn" in implementation
    return is_flash_attention_requested(requested_attention_implementation=implementation)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP / compile wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@dataclass(frozen=True)
class PackingProbe:
    """Logits of two samples packed in one row vs each alone.

    `error`: max |packed - alone|; `leak`: the same with positions not reset (what a leak looks like
    on this model). Packing is honoured when `error` is small next to `leak`.
    """

    error: float
    leak: float

    @property
    def ok(self) -> bool:
        return self.error <= 0.05 * self.leak if self.leak > 0 else self.error == 0


def probe_packing(model: nn.Module, lengths: Sequence[int] = (7, 5), seed: int = 0) -> PackingProbe:
    """Run `model` on random samples packed in one row (position_ids reset, cu_seq_lens given, no
    attention_mask) and on each alone; compare the logits.

    Works on any device and dtype (the comparison is relative to the leak), in eval mode and without
    gradients; the model's training mode is restored.

    >>> probe_packing(model).ok             # doctest: +SKIP
    True
    """
    parameter = next(model.parameters())
    vocab = _base_model(model).get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, vocab, (1, n), generator=generator).to(parameter.device) for n in lengths]
    row = torch.cat(samples, dim=1)  # [1, T]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(parameter.device)  # [1, T]
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(parameter.device)
    varlen = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens}
    varlen.update(max_length_q=max(lengths), max_length_k=max(lengths))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=row, position_ids=positions, use_cache=False, **varlen).logits.float()
            alone = torch.cat([model(input_ids=s, use_cache=False).logits.float() for s in samples], dim=1)
            not_reset = torch.arange(row.shape[1], device=row.device)[None]  # [1, T]
            leaky = model(input_ids=row, position_ids=not_reset, use_cache=False)
    finally:
        model.train(was_training)
    return PackingProbe(
        error=float((packed - alone).abs().max()), leak=float((leaky.logits.float() - alone).abs().max())
    )


def _can_probe(model: nn.Module, implementation: str) -> str | None:
    """Why the probe cannot run now (None when it can)."""
    parameters = list(model.parameters())
    if not parameters:
        return "the model has no parameters"
    for p in parameters:
        if p.device.type == "meta" or p.numel() == 0 or hasattr(p, "ds_id"):
            return "its parameters are not materialised (meta device, DeepSpeed ZeRO-3 or FSDP shards)"
    if _is_flash(implementation) and parameters[0].device.type != "cuda":
        return f"{implementation} runs on CUDA only and the model is on {parameters[0].device}"
    return None


def is_packed_batch(batch: Mapping[str, Any]) -> bool:
    """True when a row of `batch` holds several samples that attention must keep apart, whatever
    made the batch: it has no `attention_mask`, and carries `cu_seq_lens_q`, `position_ids` that
    restart at 0 inside a row, or several `segment_ids` (sample ids) in a row.

    A batch with an attention_mask, or with cu_seq_lens, is judged by its keys alone; the others
    are read (one host-device synchronisation on a GPU).

    >>> is_packed_batch({"input_ids": torch.ones(1, 4), "position_ids": torch.tensor([[0, 1, 0, 1]])})
    True
    >>> is_packed_batch({"input_ids": torch.ones(1, 4), "attention_mask": torch.ones(1, 4)})
    False
    """
    if batch.get("attention_mask") is not None:
        return False
    if batch.get("cu_seq_lens_q") is not None:
        return True
    positions = batch.get("position_ids")  # [B, L]
    if positions is not None and positions.dim() == 2 and bool((positions[:, 1:] == 0).any()):
        return True
    segments = batch.get("segment_ids")  # [B, L], -1 on padding
    if segments is None or segments.dim() != 2 or segments.numel() == 0:
        return False
    real = segments >= 0
    first = torch.where(real, segments, segments.max() + 1).amin(dim=1)  # [B]
    last = torch.where(real, segments, -1).amax(dim=1)  # [B]
    return bool((real.any(dim=1) & (first != last)).any())


def check_packing_support(model: nn.Module, padding_mode: str, probe: bool = True) -> str:
    """Check that `model`, with its `attn_implementation`, keeps the samples of packed rows apart.

    Call it once the model is built, before training (MFTTrainer.__init__ after the model is placed,
    or the training script after loading the model). With padding_mode "padding" every backend is
    fine (rows are right-padded and causal, so real tokens never see padding).

    Checks: the backend is one that honours packing (see the module docstring); the model's forward
    takes `position_ids` and passes extra keyword arguments (the cu_seq_lens) down to attention; a
    mask backend's modeling code builds masks with transformers' `create_causal_mask` (which detects
    packed rows). With `probe`, also runs `probe_packing` when the model's parameters are
    materialised (skipped for ZeRO-3/meta models and for flash kernels on CPU).

    Args:
        model: a transformers model (or a PEFT / DDP wrapper of one).
        padding_mode: the DataConfig padding_mode of the batches it will see.
        probe: also compare packed and separate logits on a tiny random batch.
    Returns:
        The attn_implementation in use.
    Raises:
        PackingError: with what is wrong and how to fix it.
    """
    mode = PaddingMode.parse(padding_mode)
    base = _base_model(model)
    implementation = getattr(base.config, "_attn_implementation", None) or "eager"
    name = type(base).__name__
    if not mode.is_packed:
        return implementation
    fix = (
        "use attn_implementation 'sdpa' (any device), 'torch_varlen' or 'flash_attention_2' (CUDA), or "
        "padding_mode 'padding'"
    )
    if implementation not in PACKING_BACKENDS and not _is_flash(implementation):
        raise PackingError(
            f"attn_implementation {implementation!r} of {name} is not known to keep packed samples apart "
            f"(padding_mode {mode.value!r}); {fix}"
        )
    parameters = inspect.signature(type(base).forward).parameters
    if "position_ids" not in parameters:
        raise PackingError(
            f"{name}.forward takes no position_ids, so positions cannot restart at each packed sample (ALiBi models "
            f"such as Bloom and MPT have no position_ids); use padding_mode 'padding'"
        )
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        raise PackingError(
            f"{name}.forward takes no **kwargs, so cu_seq_lens_q/k cannot reach its attention layers; use "
            "padding_mode 'padding'"
        )
    if implementation in MASK_BACKENDS:
        from transformers import masking_utils

        modeling = sys.modules.get(type(base).__module__)
        if getattr(modeling, "create_causal_mask", None) is not masking_utils.create_causal_mask:
            raise PackingError(
                f"{name} (module {type(base).__module__}) does not build its attention mask with transformers' "
                f"create_causal_mask, so {implementation!r} would not see where packed samples start; use "
                "attn_implementation 'flash_attention_2' or 'torch_varlen' (they take cu_seq_lens), or padding_mode "
                "'padding'"
            )
    if implementation == TORCH_VARLEN and not getattr(type(base), "_supports_attention_backend", False):
        raise PackingError(
            f"{name} does not dispatch attention through transformers' AttentionInterface, so 'torch_varlen' "
            "would never run; use attn_implementation 'sdpa' or 'flash_attention_2'"
        )
    if probe:
        reason = _can_probe(model, implementation)
        if reason is not None:
            logger.info("packing probe skipped: %s", reason)
        else:
            result = probe_packing(model)
            if not result.ok:
                raise PackingError(
                    f"{name} with attn_implementation {implementation!r} lets packed samples see each other: logits "
                    f"of two packed samples differ from the samples alone by {result.error:.3g} (a leak on this model: "
                    f"{result.leak:.3g}); {fix}"
                )
    return implementation


class PackingGuard:
    """`check_packing_support` of one model, once, before its first packed batch: at construction
    for a collator that says it packs (its `padding_mode`), else at the first batch that
    `is_packed_batch`, whatever collator made it.

    Raises:
        PackingError: (from the constructor or `check`) the model would let packed samples leak.
    """

    def __init__(self, model: nn.Module, collator: Any = None):
        self.model = model
        self.checked = False
        declared = getattr(collator, "padding_mode", None)
        if declared is not None and PaddingMode.parse(declared).is_packed:
            check_packing_support(model, declared)
            self.checked = True

    def check(self, batch: Mapping[str, Any]) -> None:
        """Check the model at the first packed batch; a no-op after that and for unpacked batches."""
        if not self.checked and is_packed_batch(batch):
            check_packing_support(self.model, PaddingMode.PACK)
            self.checked = True

