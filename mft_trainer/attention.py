"""Attention backends for packed batches, and the check that a model keeps packed samples apart.

A packed batch (padding_mode pack, concat or padding_free) holds several samples per row. It
carries `position_ids` restarting at 0 per sample, no `attention_mask`, and `cu_seq_lens_q/k` +
`max_length_q/k` (mft_trainer.collator); the model runs without cache. How each `attn_implementation`
then keeps samples apart (DESIGN.md invariant 3), as transformers 5 does it:

- `sdpa`, `eager`: `masking_utils.create_causal_mask` finds the samples from position_ids
  (`find_packed_sequence_indices`: a new sample wherever the position does not grow by 1) and builds
  a block-causal mask; it does so only with no attention_mask and no cache. Any device.
- `flex_attention`: the same rule, as a `BlockMask`. CUDA (on CPU: forward only, compiled per shape).
- `flash_attention_2`/`_3`: the batch's `cu_seq_lens_q/k` (without them transformers infers the
  boundaries from position_ids only for a batch of one row). CUDA, with the flash-attn package.
- `torch_varlen` (this module): the batch's `cu_seq_lens_q/k`, given to
  `torch.nn.attention.varlen.varlen_attn`, torch's own FlashAttention varlen kernel. CUDA sm80+;
  elsewhere an exact pure-torch reference (`reference_varlen_attention`).

`torch_varlen` gives flash-speed packing without installing flash-attn. It is registered with
transformers' `AttentionInterface` when this module is imported, so
`AutoModelForCausalLM.from_pretrained(..., attn_implementation="torch_varlen")` works after
`import mft_trainer.attention`.

>>> from mft_trainer.attention import check_packing_support, default_attn_implementation
>>> default_attn_implementation("pack", device="cpu")
'sdpa'
>>> attn = default_attn_implementation("pack")    # torch_varlen on an A100/H100 without flash-attn
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)  # doctest: +SKIP
>>> check_packing_support(model, "pack")  # raises PackingError if samples would leak  # doctest: +SKIP
>>> guard = PackingGuard(model, collator)  # MFTTrainer's: checks now if the collator packs  # doctest: +SKIP
>>> guard.check(batch)                   # else at the first batch that is_packed_batch  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .modes import PaddingMode

logger = logging.getLogger(__name__)

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch
    _torch_varlen_attn = None

TORCH_VARLEN = "torch_varlen"
# Backends whose mask transformers builds from position_ids (packed-sequence detection).
MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
# Backends that take the sequence boundaries as cu_seq_lens.
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", TORCH_VARLEN)
PACKING_BACKENDS = MASK_BACKENDS + VARLEN_BACKENDS


class PackingError(ValueError):
    """The model, as configured, would let the samples of a packed row see each other."""


# --- the torch_varlen backend ---------------------------------------------------------------------


def reference_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor,
    scale: float | None = None,
    window_left: int = -1,
) -> torch.Tensor:
    """Causal attention within each sequence of a flattened batch, in plain torch (one sdpa call per
    sequence): the definition `varlen_attn` must match, used where the kernel cannot run (CPU).

    Args:
        query: ``[T, Hq, D]``, the sequences one after the other.
        key, value: ``[T, Hkv, D]``; Hq must be a multiple of Hkv (grouped-query attention).
        cu_seq_lens_q, cu_seq_lens_k: ``[S + 1]`` sequence boundaries (equal: no cache).
        scale: softmax scale, default ``D ** -0.5``.
        window_left: attend at most this many tokens back (sliding window); -1 for no limit.
    Returns:
        ``[T, Hq, D]`` in the dtype of ``query``.
    """
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    bounds = cu_seq_lens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[start:end].transpose(0, 1)  # [Hq, n, D]
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)  # [Hq, n, D]
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)  # [Hq, n, D]
        i = torch.arange(end - start, device=query.device)
        allowed = i[:, None] >= i[None, :]  # [n, n], causal
        if window_left >= 0:
            allowed &= i[:, None] - i[None, :] <= window_left
        out[start:end] = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1)
    return out


@functools.lru_cache(maxsize=None)
def _kernel_parameters(kernel: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


def _call_torch_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor,
    max_length_q: int,
    max_length_k: int,
    scale: float | None,
    window_left: int,
) -> torch.Tensor:
    """`varlen_attn` with the arguments of the installed torch: torch 2.10 takes `is_causal`, later
    versions `window_size` (causal is `(-1, 0)`) and `enable_gqa`."""
    kernel = _torch_varlen_attn
    parameters = _kernel_parameters(kernel)
    kwargs: dict[str, Any] = {}
    if "scale" in parameters:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-6 * scale:
        raise PackingError(
            f"this torch's varlen_attn has no softmax scale argument and the model uses {scale:.4g} instead of "
            "head_dim ** -0.5; use attn_implementation 'sdpa' or a newer torch"
        )
    if "window_size" in parameters:
        kwargs["window_size"] = (window_left, 0)
    elif window_left >= 0:
        raise PackingError(
            "this torch's varlen_attn has no sliding window (window_size); use attn_implementation "
            "flash_attention_2 or sdpa for a sliding-window model, or a newer torch"
        )
    else:
        kwargs["is_causal"] = True
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        else:  # give every query head its own copy of its key/value head
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return kernel(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **kwargs)


def _use_kernel(query: torch.Tensor) -> bool:
    """The FlashAttention kernel runs on CUDA only; elsewhere the reference computes the same thing."""
    return query.is_cuda and _torch_varlen_attn is not None


def cu_seq_lens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """The ``cu_seq_lens`` of a batch that varlen kernels see as its ``B * L`` tokens in one row.

    Args:
        starts: ``[B, L]`` bool, True where a sequence starts; every row starts one at column 0.
    Returns:
        ``[S + 1]`` int32 offsets of the S sequences' starts over the flattened tokens, then ``B * L``.

    >>> cu_seq_lens_from_starts(torch.tensor([[True, False, True], [True, False, False]])).tolist()
    [0, 2, 3, 6]
    """
    boundaries = torch.nonzero(starts.reshape(-1)).reshape(-1)  # [S]
    end = torch.tensor([starts.numel()], device=starts.device)
    return torch.cat([boundaries, end]).to(torch.int32)


def _boundaries_from_positions(position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """``[S + 1]`` int32 boundaries: a sequence starts at every row start and wherever position_ids is 0."""
    starts = torch.zeros(batch, length, dtype=torch.bool)  # [B, L]
    if position_ids is not None:
        starts = position_ids.expand(batch, -1).eq(0).cpu()
    starts[:, 0] = True
    return cu_seq_lens_from_starts(starts)


def torch_varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `torch_varlen` attention function, with transformers' AttentionInterface signature.

    Args:
        module: the attention layer (for `is_causal`).
        query: ``[B, Hq, L, D]``; key, value: ``[B, Hkv, L, D]``.
        attention_mask: must be None: transformers builds no mask for this backend.
        cu_seq_lens_q/k, max_length_q/k: the sequence boundaries over the flattened ``B * L`` tokens
            (from DataCollatorForMFT in packed modes). Without them, a sequence starts at every row
            start and wherever position_ids is 0 (so right-padded batches are exact too).
    Returns:
        ``([B, L, Hq, D], None)``.
    Raises:
        PackingError: a cache (generation), dropout, softcap, attention sinks, a non-causal layer.
    """
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise PackingError(
            f"torch_varlen attention got {length} queries for {key.shape[2]} keys (a KV cache, i.e. generation); "
            "it is a training backend: generate with attn_implementation 'sdpa' (model.set_attn_implementation('sdpa'))"
        )
    if attention_mask is not None:
        raise PackingError(
            f"torch_varlen attention got an attention mask from {type(module).__name__}: this model builds its own "
            "masks and cannot use it; use attn_implementation 'sdpa' or 'flash_attention_2'"
        )
    unsupported = {"dropout": dropout, "softcap": softcap, "s_aux": kwargs.get("s_aux")}
    unsupported = {name: value for name, value in unsupported.items() if value}
    if unsupported or not getattr(module, "is_causal", True):
        what = ", ".join(unsupported) if unsupported else "non-causal attention"
        raise PackingError(
            f"torch_varlen attention does not support {what} ({type(module).__name__}); set attention_dropout 0 or "
            "use attn_implementation 'sdpa' or 'eager'"
        )
    if cu_seq_lens_q is None:
        cu_seq_lens_q = _boundaries_from_positions(position_ids, batch, length).to(query.device)
        cu_seq_lens_k = cu_seq_lens_q
        max_length_q = max_length_k = int(cu_seq_lens_q.diff().max())
    if cu_seq_lens_k is None:
        cu_seq_lens_k = cu_seq_lens_q
    if max_length_q is None:
        max_length_q = int(cu_seq_lens_q.diff().max())
    if max_length_k is None:
        max_length_k = int(cu_seq_lens_k.diff().max())
    window_left = sliding_window - 1 if sliding_window else -1

    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)  # [T, Hq, D]
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)  # [T, Hkv, D]
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)  # [T, Hkv, D]
    if _use_kernel(q):
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            # The kernel is half precision only; transformers' flash path casts the same way.
            _warn_cast_once(dtype)
            q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
        cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
        out = _call_torch_varlen(q, k, v, cu_q, cu_k, int(max_length_q), int(max_length_k), scaling, window_left)
        out = out.to(dtype)
    else:
        out = reference_varlen_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_k, scaling, window_left)
    return out.reshape(batch, length, heads, head_dim), None


@functools.lru_cache(maxsize=None)
def _warn_cast_once(dtype: torch.dtype) -> None:
    logger.warning("torch_varlen attention runs in bfloat16: the %s query/key/value are cast for the kernel", dtype)


def register_attention_backends() -> None:
    """Register `torch_varlen` with transformers' AttentionInterface (done on import; idempotent)."""
    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention_forward)


register_attention_backends()


# --- choosing and checking a backend -------------------------------------------------------------


def torch_varlen_available(device: torch.device | str | None = None) -> bool:
    """True when `varlen_attn` exists and the (CUDA) device can run FlashAttention (sm80+)."""
    if _torch_varlen_attn is None or not torch.cuda.is_available():
        return False
    device = torch.device(device if device is not None else "cuda")
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def default_attn_implementation(padding_mode: str, device: torch.device | str | None = None) -> str:
    """The backend to use for `padding_mode` on `device` (default: CUDA if available, else CPU).

    Packed modes on a CUDA GPU: `flash_attention_2` if flash-attn is installed, else `torch_varlen`
    (sm80+), which both skip the dense mask entirely; everything else: `sdpa`.

    >>> default_attn_implementation("padding", device="cpu")
    'sdpa'
    """
    mode = PaddingMode.parse(padding_mode)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not mode.is_packed:
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return "flash_attention_2"
    if torch_varlen_available(device):
        return TORCH_VARLEN
    return "sdpa"


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

