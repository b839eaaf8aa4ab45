"""Per-token cross-entropy and its reduction by loss mode, exact across micro-batches and ranks.

A step's loss is a ratio whose denominators (trained tokens / samples, overall or per task) span the
whole optimizer step: every micro-batch of the gradient-accumulation window on every rank. MFTTrainer
uses the module in three places:

- once per step (`get_batch_samples`): :func:`count_normalizers` over the step's micro-batches, then
  one all-reduce of ``LossNormalizers.stacked()`` over the ranks;
- per micro-batch (`compute_loss`): :func:`task_loss_sums` of its per-token losses, and
  :func:`combine_task_sums` with the step's normalizers gives the micro-batch's *contribution*:
  the contributions of all micro-batches (and ranks) sum to exactly the loss, and gradient, of the
  whole step in one batch. The chunked loss, which computes the gradient in its forward pass, gets
  the per-token weights of that sum from :func:`loss_coefficients`;
- at evaluation: the task sums and counts of the whole set, combined once by :func:`combine_task_sums`.

:func:`reduce_loss` is the two steps of a micro-batch in one call (task sums, then combination): what
:func:`loss_coefficients` differentiates, and the reference the tests compare the trainer with.

Batch contract (all ``[B, L]`` int64): ``labels`` (not pre-shifted, -100 = no loss, column 0 never a
target), ``task_ids`` (-1 on padding), ``segment_ids`` (sample id unique within the micro-batch, -1 on
padding; a packed row holds several samples, and a sample is never split across micro-batches).
All reductions are vectorised and avoid boolean indexing, so they cause no host-device sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import IGNORE_INDEX
from .modes import LossMode


class LossTargets(NamedTuple):
    """The keys of a batch that feed the loss and never reach the model's forward, per the batch
    contract: ``labels``, ``task_ids``, ``segment_ids`` (each ``[B, L]``)."""

    labels: Tensor
    task_ids: Tensor
    segment_ids: Tensor


def split_loss_targets(batch: Mapping[str, Any]) -> tuple[LossTargets, dict[str, Any]]:
    """The loss's keys of `batch` and the rest, the model's inputs (`batch` itself is not changed).

    >>> targets, inputs = split_loss_targets(collator(samples))     # doctest: +SKIP
    >>> sorted(inputs)                                               # doctest: +SKIP
    ['attention_mask', 'input_ids']

    Raises:
        ValueError: a key of the contract is missing (the batch was not made by DataCollatorForMFT).
    """
    missing = [key for key in LossTargets._fields if key not in batch]
    if missing:
        raise ValueError(
            f"the batch has no {missing}: MFTTrainer needs batches from DataCollatorForMFT (the default "
            "collator) over rows of build_mft_dataset"
        )
    inputs = dict(batch)
    return LossTargets(*(inputs.pop(key) for key in LossTargets._fields)), inputs


def trained_mask(labels: Tensor) -> Tensor:
    """Positions that carry loss.

    Args:
        labels: ``[B, L]`` target ids, -100 where untrained.
    Returns:
        ``[B, L]`` bool, ``labels != -100`` with column 0 False (no logit predicts the first token).
    """
    mask = labels != IGNORE_INDEX  # [B, L]
    mask[:, 0] = False
    return mask


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are reduced in for inputs of `dtype`: float64 stays, anything lower is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each target token, aligned with ``labels``.

    This needs the full logits; `chunked_loss.OutputHeadLoss` gives the same values from the hidden
    states without them.

    Args:
        logits: ``[B, L, V]``; ``logits[:, j]`` predicts token ``j + 1``. Any float dtype.
        labels: ``[B, L]`` target ids, -100 where untrained.
    Returns:
        ``[B, L]`` float32 (float64 for float64 logits); ``out[:, j]`` is the CE of ``labels[:, j]`` given ``logits[:, j - 1]``,
        0 where untrained and in column 0.
    """
    B, L, V = logits.shape
    # Shift the labels, not the logits: slicing logits[:, :-1] gives a non-contiguous view that
    # flattening would copy, on top of the float32 upcast. Here the upcast is the only copy.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, L], shifted[:, j] = labels[:, j+1]
    loss = F.cross_entropy(
        logits.reshape(-1, V).to(loss_dtype(logits.dtype)), shifted.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).view(B, L)  # [B, L], loss[:, j] scores labels[:, j+1]
    return F.pad(loss[:, :-1], (1, 0))  # [B, L], re-aligned with labels


def _sample_stats(
    mask: Tensor, task_ids: Tensor, segment_ids: Tensor, values: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample sums over trained tokens, indexed by segment id.

    Samples are defined by segment ids, never rows, so packed rows are handled. Output has
    ``N = B * L`` slots (an upper bound on segment ids) so no ``max().item()`` sync is needed.

    Returns:
        ``(value_sum [N], trained_count [N], task [N])``; task is -1 for slots with no trained token.
    """
    n = mask.numel()
    seg = torch.where(mask, segment_ids, 0).reshape(-1)  # [N]; untrained tokens add 0 to slot 0
    counts = torch.zeros(n, dtype=torch.float32, device=mask.device).index_add_(
        0, seg, mask.reshape(-1).float()
    )  # [N]
    sums = counts if values is None else torch.zeros(n, dtype=values.dtype, device=mask.device).index_add(
        0, seg, torch.where(mask, values, 0).reshape(-1)
    )  # [N]
    # A sample's task is the task of its trained tokens (all equal); amax picks it, -1 if none.
    task = torch.full((n,), -1, dtype=torch.long, device=mask.device).scatter_reduce_(
        0, seg, torch.where(mask, task_ids, -1).reshape(-1), reduce="amax"
    )  # [N]
    return sums, counts, task


def _safe(x: Tensor) -> Tensor:
    """Replace zero denominators by 1; their numerators are 0, so the quotient is 0, never NaN."""
    return torch.where(x > 0, x, torch.ones_like(x))


@dataclass
class LossNormalizers:
    """Denominators of one optimizer step, over all its micro-batches and (after all-reduce) ranks.

    Attributes:
        tokens_per_task: ``[T]`` float32, trained tokens of each task.
        samples_per_task: ``[T]`` float32, samples with at least one trained token, by task.
    """

    tokens_per_task: Tensor
    samples_per_task: Tensor

    def stacked(self) -> Tensor:
        """Both counts as one ``[2, T]`` tensor, so the caller all-reduces (SUM) once."""
        return torch.stack([self.tokens_per_task, self.samples_per_task])

    @classmethod
    def from_stacked(cls, stacked: Tensor) -> LossNormalizers:
        """Inverse of :meth:`stacked`."""
        return cls(tokens_per_task=stacked[0], samples_per_task=stacked[1])


def count_normalizers(
    batches: Sequence[Mapping[str, Tensor]], num_tasks: int, device: torch.device | str | None = None
) -> LossNormalizers:
    """Count trained tokens and samples per task over the micro-batches of one step (local rank).

    Args:
        batches: micro-batches with ``labels``, ``task_ids``, ``segment_ids`` (each ``[B, L]``).
        num_tasks: T.
        device: where the counts live; default the device of the first batch's labels (else CPU).
    Returns:
        Local :class:`LossNormalizers`; all-reduce ``stacked()`` across ranks before use.
    """
    if device is None:
        device = batches[0]["labels"].device if batches else "cpu"
    tokens = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    samples = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    for batch in batches:  # a loop over micro-batches, not samples
        labels, task_ids = batch["labels"].to(device), batch["task_ids"].to(device)
        mask = trained_mask(labels)  # [B, L]
        # index_add (not bincount) so an out-of-range task id fails loudly instead of being dropped.
        tokens.index_add_(0, torch.where(mask, task_ids, 0).reshape(-1), mask.reshape(-1).float())
        _, _, seg_task = _sample_stats(mask, task_ids, batch["segment_ids"].to(device))  # [N]
        has = seg_task >= 0  # [N], slots holding a sample with >= 1 trained token
        samples.index_add_(0, seg_task.clamp(min=0), has.float())
    return LossNormalizers(tokens_per_task=tokens, samples_per_task=samples)


def task_loss_sums(
    per_token_loss: Tensor, labels: Tensor, task_ids: Tensor, segment_ids: Tensor, num_tasks: int
) -> Tensor:
    """Per-task sums of a micro-batch, the numerators of every loss mode (differentiable).

    Args:
        per_token_loss: ``[B, L]`` loss aligned with labels (as from :func:`per_token_cross_entropy`).
        labels, task_ids, segment_ids: ``[B, L]`` per the batch contract.
        num_tasks: T.
    Returns:
        ``[2, T]`` in the dtype of ``per_token_loss``: row 0 the sum of the task's token losses, row 1
        the sum over the task's samples of each sample's token-mean loss.
    """
    dtype, device = per_token_loss.dtype, per_token_loss.device
    mask = trained_mask(labels)  # [B, L]
    loss = torch.where(mask, per_token_loss, 0)  # [B, L]; where, not *, so a stray inf/NaN can't leak
    token_sums = torch.zeros(num_tasks, dtype=dtype, device=device).index_add(
        0, torch.where(mask, task_ids, 0).reshape(-1), loss.reshape(-1)
    )  # [T]
    seg_sum, seg_count, seg_task = _sample_stats(mask, task_ids, segment_ids, loss)  # [N] each
    seg_mean = seg_sum / _safe(seg_count.to(dtype))  # [N], 0 for slots without trained tokens
    # Slots without a sample have mean 0, so adding them to task 0 changes nothing.
    sample_mean_sums = torch.zeros(num_tasks, dtype=dtype, device=device).index_add(
        0, seg_task.clamp(min=0), seg_mean
    )  # [T]
    return torch.stack([token_sums, sample_mean_sums])


def combine_task_sums(
    sums: Tensor, mode: LossMode | str, normalizers: LossNormalizers, task_weights: Tensor | None = None
) -> Tensor:
    """The loss of the given mode from per-task sums and step-wide counts: the one place where the
    formulas of DESIGN.md live.

    With the sums of one micro-batch this is that micro-batch's contribution to the step loss; with
    the sums of a whole step (or evaluation set) and its counts, it is that loss.

    Args:
        sums: ``[2, T]`` from :func:`task_loss_sums` (summed over any number of micro-batches).
        mode: a :class:`LossMode` or any name accepted by :meth:`LossMode.parse`.
        normalizers: counts over the whole step (accumulation window, all ranks) or evaluation set.
        task_weights: ``[T]`` weights w_t for case3/case4/coba (default all 1); ignored by case1/case2.
    Returns:
        Scalar in the dtype of ``sums``.
    """
    mode = LossMode.parse(mode)
    dtype, device = sums.dtype, sums.device
    tokens = normalizers.tokens_per_task.to(device, dtype)  # [T]
    samples = normalizers.samples_per_task.to(device, dtype)  # [T]
    token_sums, sample_mean_sums = sums[0], sums[1]  # [T] each

    if mode is LossMode.CASE1:
        return token_sums.sum() / _safe(tokens.sum())
    if mode is LossMode.CASE2:
        return sample_mean_sums.sum() / _safe(samples.sum())
    if mode is LossMode.CASE4:
        numer, denom = sample_mean_sums, samples
    else:  # CASE3, COBA
        numer, denom = token_sums, tokens
    # Only tasks present in the step take part, so an absent task's weight does not dilute W.
    present = tokens > 0  # [T]
    w = torch.ones_like(tokens) if task_weights is None else task_weights.to(device, dtype)
    w = torch.where(present, w, torch.zeros_like(w))  # [T]
    return (w * numer / _safe(denom)).sum() / _safe(w.sum())


def loss_coefficients(
    labels: Tensor,
    task_ids: Tensor,
    segment_ids: Tensor,
    mode: LossMode | str,
    normalizers: LossNormalizers,
    task_weights: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """d(contribution)/d(per-token loss) of this micro-batch: the ``c`` in ``contribution = sum c * loss``.

    Every mode's contribution is linear in the per-token losses (the counts and weights are fixed for
    the step), so a fused kernel can compute the gradient during the forward pass. The coefficients
    come from differentiating :func:`reduce_loss` itself, so that the formulas stay in one place.

    Args:
        as :func:`reduce_loss`, without the per-token loss; dtype: of the result.
    Returns:
        ``[B, L]`` coefficients aligned with labels, 0 where untrained.
    """
    with torch.enable_grad():
        probe = torch.zeros(labels.shape, dtype=dtype, device=labels.device, requires_grad=True)
        contribution = reduce_loss(probe, labels, task_ids, segment_ids, mode, normalizers, task_weights)
        (coefficients,) = torch.autograd.grad(contribution, probe)
    return coefficients


def reduce_loss(
    per_token_loss: Tensor,
    labels: Tensor,
    task_ids: Tensor,
    segment_ids: Tensor,
    mode: LossMode | str,
    normalizers: LossNormalizers,
    task_weights: Tensor | None = None,
) -> Tensor:
    """This micro-batch's contribution to the step loss; contributions sum to the step loss.

    :func:`task_loss_sums` then :func:`combine_task_sums`: MFTTrainer calls the two apart, since it
    also logs the per-task sums; this one call is what :func:`loss_coefficients` differentiates and
    what a custom training loop (or a test) needs.

    Args:
        per_token_loss: ``[B, L]`` loss aligned with labels (as from :func:`per_token_cross_entropy`).
        labels, task_ids, segment_ids: ``[B, L]`` per the batch contract.
        mode: a :class:`LossMode` or any name accepted by :meth:`LossMode.parse`.
        normalizers: step-wide counts (whole accumulation window, all ranks).
        task_weights: ``[T]`` weights w_t for case3/case4/coba (default all 1); ignored by case1/case2.
    Returns:
        Scalar in the dtype of ``per_token_loss``, connected to it even when nothing is trained.
    """
    num_tasks = normalizers.tokens_per_task.numel()
    sums = task_loss_sums(per_token_loss, labels, task_ids, segment_ids, num_tasks)  # [2, T]
    return combine_task_sums(sums, mode, normalizers, task_weights)


def task_loss_metrics(token_sums: Tensor, tokens: Tensor, names: Sequence[str], key: str) -> dict[str, float]:
    """``{key}/{task}``: the token-mean loss of each task that has trained tokens, from sums over
    any window (a logging interval, an evaluation set).

    >>> task_loss_metrics(torch.tensor([3.0, 0.0]), torch.tensor([2.0, 0.0]), ["qa", "chat"], "loss")
    {'loss/qa': 1.5}
    """
    return {f"{key}/{name}": (token_sums[t] / tokens[t]).item() for t, name in enumerate(names) if tokens[t] > 0}


def evaluation_loss_metrics(
    sums: Tensor, mode: LossMode | str, task_weights: Tensor, names: Sequence[str], prefix: str = "eval"
) -> dict[str, float]:
    """The metrics of an evaluation set: ``{prefix}_loss``, the mode's loss of the whole set, and
    ``{prefix}_loss/{task}``, each task's token mean; {} for a set without trained tokens.

    Args:
        sums: ``[4, T]`` over the whole set (all batches, all ranks): the two rows of
            :func:`task_loss_sums`, then `LossNormalizers.stacked()` (trained tokens, samples).
        task_weights: ``[T]`` the configured weights (case3/case4/coba).
    """
    if not sums[2].sum() > 0:
        return {}
    loss = combine_task_sums(sums[:2], mode, LossNormalizers.from_stacked(sums[2:]), task_weights.to(sums.device))
    return {f"{prefix}_loss": loss.item(), **task_loss_metrics(sums[0], sums[2], names, f"{prefix}_loss")}

