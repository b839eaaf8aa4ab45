"""Per-token cross-entropy straight from the hidden states, without full-vocabulary logits.

The plain path (`losses.per_token_cross_entropy`) needs the model's logits for every position:
``[tokens, vocab]`` in bfloat16, a float32 copy, and their gradients. At 16k tokens and a 150k
vocabulary that is ~5 GB, ~10 GB and as much again in the backward pass. Here the output layer is
applied to a chunk of positions at a time, and only to positions that have a target:

* forward: per chunk, logits -> log-sum-exp -> per-token loss; while the chunk's logits are at hand
  the gradients of the step loss with respect to the chunk's hidden states and the output weight are
  computed too (the step loss is linear in the per-token losses, ``sum_i c_i * loss_i``, so its
  gradient is known in the forward pass); nothing of size ``vocab`` outlives its chunk.
* backward: the stored gradients times the incoming scalar (world-size factor, fp16 loss scale).

So the output layer costs the same matmuls as the plain path (no recomputation), and the extra
memory is one chunk of logits plus the gradient of the hidden states (``[tokens, hidden]``, float32)
and, when the output layer is trained, its gradient (float32).

>>> hidden = torch.randn(6, 8, requires_grad=True); weight = torch.randn(50, 8, requires_grad=True)
>>> targets = torch.randint(0, 50, (6,)); coefficients = torch.full((6,), 1 / 6)
>>> loss, per_token = linear_cross_entropy(hidden, weight, targets, coefficients, chunk_size=4)
>>> loss.backward()          # hidden.grad and weight.grad as for F.cross_entropy(hidden @ weight.T, targets)

`OutputHeadLoss` plugs this into any causal LM whose output layer is a plain `nn.Linear` whose output
is the model's logits unchanged (checked once on the model itself by `OutputHeadLoss.probe`):
while its `computing` context is active, the layer's forward returns the loss instead of logits.
Hooks that DeepSpeed ZeRO-3 and FSDP put around that layer (gathering its weight) keep working,
because the layer is still called by the model.

`choose_output_head_loss` decides, once per run, between this path and the plain one
(`loss_implementation`); `forward_per_token_loss` runs a forward by either and returns the
per-token losses:

>>> head_loss = choose_output_head_loss(model, batch["input_ids"][:1, :16], "auto")   # doctest: +SKIP
>>> outputs, per_token, loss = forward_per_token_loss(model, inputs, labels, head_loss)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .constants import IGNORE_INDEX
from .losses import loss_dtype, per_token_cross_entropy
from .modes import LossImplementation

logger = logging.getLogger(__name__)

# Bytes of chunk-sized buffers per (token, vocabulary entry): logits in the compute dtype (2),
# their float32 copy turned into probabilities in place (4), the gradient in the compute dtype (2).
_BYTES_PER_LOGIT = 8
DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Positions per chunk so that a chunk's vocabulary-sized buffers take about `budget_bytes`
    (1 GiB by default: 832 positions at a 152k vocabulary), a multiple of 64, at least 64."""
    return max(64, budget_bytes // (_BYTES_PER_LOGIT * vocab_size) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i c_i * CE(hidden_i @ weight.T + bias, target_i)`` and the per-token CE, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        coefficients: Tensor,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        n, h = hidden.shape
        acc = loss_dtype(hidden.dtype)
        device = hidden.device
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        # The gradient is scale * sum_i unit_i * dCE_i; unit is at most 1 in magnitude, so the
        # low-precision matmuls never see the tiny 1/tokens factors (which underflow in float16).
        scale = (
            coefficients.abs().max().to(acc).clamp_min(torch.finfo(acc).tiny) if n
            else torch.ones((), dtype=acc, device=device)
        )
        unit = coefficients.to(acc) / scale  # [N]
        grad_hidden = torch.empty(n, h, dtype=acc, device=device) if need_hidden else None  # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None  # [V, H]
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_bias else None  # [V]
        losses = torch.empty(n, dtype=acc, device=device)  # [N]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            chunk = hidden[start:end]  # [C, H]
            target = targets[start:end]  # [C]
            logits = nn.functional.linear(chunk, weight, bias).to(acc)  # [C, V]; a new tensor unless acc == dtype
            log_norm = torch.logsumexp(logits, dim=-1)  # [C]
            losses[start:end] = log_norm - logits.gather(1, target[:, None]).squeeze(1)
            if not (need_hidden or need_weight or need_bias):
                continue
            # dCE/dlogits = softmax - onehot, built in place in the float32 buffer.
            probs = logits.sub_(log_norm[:, None]).exp_()  # [C, V]
            probs[torch.arange(end - start, device=device), target] -= 1
            u = unit[start:end, None]  # [C, 1]
            # As in the plain path, the matmuls run in the layer's dtype on the rounded gradient.
            grad_logits = probs.to(hidden.dtype)  # [C, V]
            if need_hidden:
                grad_hidden[start:end] = (grad_logits @ weight).to(acc) * u  # [C, H]
            if need_weight:
                grad_weight += (grad_logits.T @ (chunk * u.to(chunk.dtype))).to(acc)  # [V, H]
            if need_bias:
                grad_bias += (probs * u).sum(0)  # [V]
            del logits, probs, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(losses)
        loss = (losses * coefficients.to(acc)).sum()
        return loss, losses

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_losses: Tensor | None):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias, scale = ctx.saved_tensors
        factor = grad_loss.to(scale.dtype) * scale
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else (grad_hidden * factor).to(hidden_dtype),
            None if grad_weight is None else (grad_weight * factor).to(weight_dtype),
            None if grad_bias is None else (grad_bias * factor).to(bias_dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    coefficients: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against `targets`, never materialising more than
    `chunk_size` rows of logits.

    Args:
        hidden: ``[N, H]`` hidden states of the positions that have a target.
        weight: ``[V, H]`` output layer weight; bias: ``[V]`` or None.
        targets: ``[N]`` int64 target ids, all valid (select the trained positions beforehand).
        coefficients: ``[N]`` weights c_i of the differentiable loss ``sum_i c_i * CE_i``; None when
            only the per-token values are wanted (evaluation): then the loss is None and nothing is
            kept for a backward pass.
        chunk_size: positions per chunk (default :func:`default_chunk_size`).
    Returns:
        ``(loss, per_token)``: the scalar ``sum_i c_i * CE_i`` (or None) and the ``[N]`` per-token
        CE, detached, in float32 (float64 for float64 inputs).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    if coefficients is None:
        with torch.no_grad():
            zeros = torch.zeros(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)
            _, per_token = _LinearCrossEntropy.apply(hidden, weight, bias, targets, zeros, chunk_size)
        return None, per_token
    if coefficients.shape != targets.shape:
        raise ValueError(f"coefficients must be [N] like targets, got {tuple(coefficients.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, coefficients, chunk_size)


@dataclass
class HeadLossResult:
    """What the output layer computed during `OutputHeadLoss.computing`.

    Attributes:
        per_token: ``[B, L]`` CE aligned with the labels (as `losses.per_token_cross_entropy`),
            detached; 0 where untrained and in column 0.
        loss: the differentiable ``sum c * CE`` when coefficients were given, else None. It is also
            what the model returns as its logits.
    """

    per_token: Tensor | None = None
    loss: Tensor | None = None


class OutputHeadLoss:
    """Makes a causal LM's output layer return the loss instead of logits, for one forward at a time.

    >>> head_loss = OutputHeadLoss.for_model(model)         # doctest: +SKIP
    >>> problem = head_loss.probe(model, input_ids[:1, :16])  # None: the model is supported
    >>> with head_loss.computing(labels, coefficients) as result:
    ...     model(input_ids=input_ids)                          # result.loss, result.per_token
    """

    def __init__(self, head: nn.Linear, chunk_size: int | None = None):
        self.head = head
        self.chunk_size = chunk_size or default_chunk_size(head.out_features)

    @staticmethod
    def find_head(model: nn.Module) -> tuple[nn.Linear | None, str]:
        """The model's output layer if this path can compute its loss, else None and why not."""
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is None:
            return None, f"{type(model).__name__} has no output embedding layer (get_output_embeddings)"
        if type(head) is not nn.Linear:  # noqa: E721 - subclasses (4-bit, LoRA) transform the weight
            return None, (
                f"its output layer is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear "
                "(a LoRA-adapted, quantized or wrapped lm_head)"
            )
        return head, ""

    @classmethod
    def for_model(cls, model: nn.Module, chunk_size: int | None = None) -> OutputHeadLoss:
        """Raises ValueError (with the reason) when the model's output layer is not supported."""
        head, reason = cls.find_head(model)
        if head is None:
            raise ValueError(f"the chunked loss cannot be used: {reason}")
        return cls(head, chunk_size)

    def probe(self, model: nn.Module, input_ids: Tensor) -> str | None:
        """Run `model` once on `input_ids` (a few tokens; no gradient, eval mode) and check that its
        logits are exactly its output layer's output, computed from every position: anything the model
        does after the layer (soft-capping, scaling, slicing the vocabulary) would make the chunked
        loss wrong. Returns None when supported, else what is wrong."""
        calls: list[tuple[Tensor, Tensor]] = []
        handle = self.head.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(input_ids=input_ids, use_cache=False).logits
        finally:
            handle.remove()
            model.train(was_training)
        if len(calls) != 1:
            return f"the model called its output layer {len(calls)} times in one forward (expected once)"
        head_input, head_output = calls[0]
        if head_input.shape[:-1] != input_ids.shape:
            return f"the output layer saw hidden states of shape {tuple(head_input.shape)} for input {tuple(input_ids.shape)}"
        if logits.shape != head_output.shape or not torch.equal(logits, head_output.to(logits.dtype)):
            return "the model changes the output layer's logits (soft-capping, scaling or slicing)"
        return None

    @contextmanager
    def computing(self, labels: Tensor, coefficients: Tensor | None = None) -> Iterator[HeadLossResult]:
        """While active, the output layer takes the hidden states ``[B, L, H]`` and returns the loss.

        Args:
            labels: ``[B, L]`` as in the batch (not shifted; -100 = no target).
            coefficients: ``[B, L]`` d(step loss)/d(per-token loss), aligned with labels (see
                `losses.loss_coefficients`), for training; None for evaluation.
        Yields:
            A `HeadLossResult`, filled in by the forward. The layer returns ``result.loss`` shaped
            ``[1, 1, 1]`` (training) or ``result.per_token`` as ``[B, L, 1]`` (evaluation).
        """
        result = HeadLossResult()
        head = self.head

        def forward(hidden: Tensor) -> Tensor:
            if hidden.shape[:-1] != labels.shape:
                raise RuntimeError(
                    f"the output layer got hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}"
                )
            b, length, h = hidden.shape
            # The last layers may sit on another device than the batch (a model split with device_map).
            target_labels = labels.to(hidden.device)
            weights = None if coefficients is None else coefficients.to(hidden.device)
            # Position j predicts labels[:, j + 1]; only positions with a target go through the layer.
            targets = target_labels[:, 1:].reshape(-1)  # [B*(L-1)]
            positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [M], into [B, L-1]
            span = max(length - 1, 1)  # no targets at all when L == 1
            flat = positions // span * length + positions % span  # [M], the predicting position in [B*L]
            selected = hidden.reshape(b * length, h).index_select(0, flat)  # [M, H]
            chosen = None if weights is None else weights.reshape(-1).index_select(0, flat + 1)  # [M]
            loss, per_token = linear_cross_entropy(
                selected, head.weight, targets.index_select(0, positions), chosen, head.bias, self.chunk_size
            )
            # Loss of labels[:, j] sits at column j (flat + 1), as in per_token_cross_entropy.
            aligned = torch.zeros(b * length, dtype=per_token.dtype, device=per_token.device)
            result.per_token = aligned.index_copy_(0, flat + 1, per_token).view(b, length)
            result.loss = loss
            return result.per_token[..., None] if loss is None else loss.view(1, 1, 1)

        # An instance attribute shadows the class's forward; the module's hooks still run around it.
        previous = head.__dict__.get("forward")  # e.g. accelerate's device hooks set one
        head.forward = forward
        try:
            yield result
        finally:
            if previous is None:
                del head.forward
            else:
                head.forward = previous


def choose_output_head_loss(
    model: nn.Module,
    probe_ids: Tensor,
    implementation: LossImplementation | str = LossImplementation.AUTO,
    chunk_size: int | None = None,
    torch_compile: bool = False,
    unwrapped: nn.Module | None = None,
) -> OutputHeadLoss | None:
    """The chunked loss for `model`, or None for the plain path (full logits), as
    `loss_implementation` asks: `plain`; `chunked`, which must work; or `auto`, chunked when the
    output layer is supported and the probe forward on `probe_ids` passes, else plain.

    Args:
        model: the model as it runs (possibly wrapped for DDP); the probe runs through it.
        probe_ids: ``[1, n]`` a few token ids (MFTTrainer takes 16 of its first batch).
        chunk_size: positions per chunk; None or 0 for `default_chunk_size`.
        torch_compile: the model is compiled: `auto` is then plain, since the output layer's forward
            is swapped at every step and a compiled model would recompile.
        unwrapped: the model under its wrappers, where the output layer is looked up (default `model`).
    Raises:
        ValueError: `chunked` for a model whose output layer cannot compute it (with the reason).
    """
    choice = LossImplementation.parse(implementation)
    if choice is LossImplementation.PLAIN:
        return None
    if choice is LossImplementation.AUTO and torch_compile:
        logger.info("per-token loss: plain (full logits), because torch_compile is on")
        return None
    head, reason = OutputHeadLoss.find_head(model if unwrapped is None else unwrapped)
    if head is not None:
        candidate = OutputHeadLoss(head, chunk_size or None)
        reason = candidate.probe(model, probe_ids) or ""
        if not reason:
            logger.info("per-token loss: chunked, %d positions per chunk", candidate.chunk_size)
            return candidate
    if choice is LossImplementation.CHUNKED:
        raise ValueError(
            f"loss_implementation: chunked cannot be used with this model: {reason}. Use loss_implementation: "
            "plain (or auto, which falls back to plain)."
        )
    logger.info("per-token loss: plain (full logits), because %s", reason)
    return None


def forward_per_token_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    labels: Tensor,
    head_loss: OutputHeadLoss | None,
    coefficients: Tensor | None = None,
) -> tuple[Any, Tensor, Tensor | None]:
    """Run `model` on `inputs` (no labels, no cache) and return ``(outputs, per_token, loss)``.

    `per_token` is the ``[B, L]`` cross-entropy aligned with `labels`. Without `head_loss` the plain
    path takes it from the model's full logits and `loss` is None; with it, the output layer computes
    it, and with `coefficients` (`losses.loss_coefficients`) also the differentiable step loss
    ``sum(coefficients * per_token)``, returned as `loss` (else None).

    Raises:
        RuntimeError: the chunked path, and the model's forward never called its output layer.
    """
    if head_loss is None:
        outputs = model(**inputs, use_cache=False)
        return outputs, per_token_cross_entropy(outputs.logits, labels), None
    with head_loss.computing(labels, coefficients) as result:
        outputs = model(**inputs, use_cache=False)
    if result.per_token is None:
        raise RuntimeError("the model's forward did not call its output layer; use loss_implementation: plain")
    # The loss as the model returned it (in place of logits), not result.loss: hooks on the layer's
    # output (DeepSpeed ZeRO-3 gathers the layer's weight in them before its backward) must see it.
    loss = None if result.loss is None else outputs.logits.reshape(())
    return outputs, result.per_token, loss
