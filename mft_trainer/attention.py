"""Attention backends for packed batches (mft_trainer/packing_guard.py checks that a model keeps
packed samples apart).

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

>>> from mft_trainer.attention import default_attn_implementation
>>> default_attn_implementation("pack", device="cpu")
'sdpa'
>>> attn = default_attn_implementation("pack")    # torch_varlen on an A100/H100 without flash-attn
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
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
