"""The chunked per-token loss (mft_trainer/chunked_loss.py): the same losses and gradients as the plain
path from full logits, for the kernel alone and through MFTTrainer on every supported model family,
and a clear refusal (or fallback to plain) where a model changes its logits after the output layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.chunked_loss import OutputHeadLoss, default_chunk_size, linear_cross_entropy
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.modes import LossMode
from mft_trainer.losses import (
    count_normalizers,
    loss_coefficients,
    per_token_cross_entropy,
    reduce_loss,
)

from .distributed.one_step import make_samples
from .helpers import tiny_llama
from .test_model_families import COMMON, FAMILIES


def plain_reference(hidden, weight, bias, targets, coefficients):
    """sum(c * CE) and per-token CE through full logits, as the plain path computes them."""
    logits = F.linear(hidden, weight, bias)
    per_token = F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="none")
    return (per_token * coefficients).sum(), per_token


def leaves(n, h, v, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    coefficients = torch.rand(n, generator=gen, dtype=torch.float64) / max(n, 1)
    return hidden, weight, b, targets, coefficients


def gradients(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_full_logits_in_float64(chunk_size, bias):
    hidden, weight, b, targets, c = leaves(50, 16, 97, torch.float64, bias=bias)
    loss, per_token = linear_cross_entropy(hidden, weight, targets, c, b, chunk_size=chunk_size)
    ref_loss, ref_per_token = plain_reference(hidden, weight, b, targets, c)
    torch.testing.assert_close(per_token, ref_per_token.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for got, expected in zip(gradients(loss, (hidden, weight, b)), gradients(ref_loss, (hidden, weight, b))):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_kernel_matches_full_logits_in_low_precision(dtype, tolerance):
    """Low-precision inputs: per-token losses to float32 accuracy (the reduction is float32 in both), and
    gradients to the input precision."""
    hidden, weight, b, targets, c = leaves(70, 32, 301, dtype)
    loss, per_token = linear_cross_entropy(hidden, weight, targets, c.float(), b, chunk_size=16)
    ref_loss, ref_per_token = plain_reference(hidden, weight, b, targets, c.float())
    assert per_token.dtype == torch.float32
    torch.testing.assert_close(per_token, ref_per_token.detach(), rtol=1e-4, atol=1e-4)
    for got, expected in zip(gradients(loss, (hidden, weight, b)), gradients(ref_loss, (hidden, weight, b))):
        scale = expected.abs().max()
        assert (got.float() - expected.float()).abs().max() <= tolerance * scale


def test_float16_gradients_do_not_underflow_with_tiny_coefficients():
    """Coefficients of 1/tokens in a large step (here 1e-6) times hidden states fall below float16's normal
    range; the kernel keeps them out of the low-precision matmuls and scales in float32, so the gradient is
    the float32 one, rounded."""
    hidden, weight, b, targets, _ = leaves(40, 16, 200, torch.float32)
    c = torch.full((40,), 1e-6)
    h16, w16 = hidden.detach().half().requires_grad_(), weight.detach().half().requires_grad_()
    loss, _ = linear_cross_entropy(h16, w16, targets, c, chunk_size=8)
    (loss * 65536).backward()  # fp16 training scales the loss before the backward
    ref_loss, _ = plain_reference(h16.float(), w16.float(), None, targets, c)
    ref_h, ref_w = gradients(ref_loss * 65536, (h16, w16))
    for got, expected in ((h16.grad, ref_h), (w16.grad, ref_w)):
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_kernel_edge_cases():
    hidden, weight, _, targets, c = leaves(0, 8, 20, torch.float32, bias=False)
    loss, per_token = linear_cross_entropy(hidden, weight, targets, c.float())
    assert per_token.shape == (0,) and loss.item() == 0.0
    loss.backward()  # an empty micro-batch still backpropagates (zeros)
    assert hidden.grad.shape == (0, 8) and weight.grad.abs().sum() == 0

    hidden, weight, _, targets, c = leaves(9, 8, 20, torch.float32, bias=False)
    none, per_token = linear_cross_entropy(hidden, weight, targets)  # evaluation: values only
    assert none is None and not per_token.requires_grad
    frozen = weight.detach()  # a frozen output layer (LoRA): no weight gradient is computed or returned
    loss, _ = linear_cross_entropy(hidden, frozen, targets, c.float())
    loss.backward()
    assert hidden.grad is not None and frozen.grad is None
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3], c.float())
    assert default_chunk_size(151936) == 832 and default_chunk_size(10) >= 64


# ------------------------------------------------------------------- through the model and the trainer


def padded_batch():
    return DataCollatorForMFT(pad_token_id=0)(make_samples())


def packed_batch():
    samples = make_samples()
    rows = [samples[:3], samples[3:5], samples[5:]]
    features = [
        {
            "input_ids": [t for s in row for t in s["input_ids"]],
            "labels": [t for s in row for t in s["labels"]],
            "task_ids": [s["task_id"] for s in row for _ in s["input_ids"]],
            "position_ids": [p for s in row for p in range(len(s["input_ids"]))],
        }
        for row in rows
    ]
    return DataCollatorForMFT(pad_token_id=0, padding_mode="pack")(features)


@pytest.mark.parametrize("layout", ["padding", "pack"])
def test_output_head_per_token_loss_equals_plain(layout):
    model = tiny_llama(64, dtype=torch.float64)
    batch = padded_batch() if layout == "padding" else packed_batch()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        expected = per_token_cross_entropy(model(**inputs).logits, batch["labels"])
    head_loss = OutputHeadLoss.for_model(model, chunk_size=5)
    assert head_loss.probe(model, batch["input_ids"][:1, :8]) is None
    with torch.no_grad(), head_loss.computing(batch["labels"]) as result:
        model(**inputs)
    assert result.loss is None
    torch.testing.assert_close(result.per_token, expected, rtol=1e-12, atol=1e-12)
    assert "forward" not in model.lm_head.__dict__  # the layer is itself again


@pytest.mark.parametrize("mode", list(LossMode))
def test_coefficients_are_the_gradient_of_the_reduction(mode):
    batch = packed_batch()
    weights = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    normalizers = count_normalizers([batch], 3)
    keys = (batch["labels"], batch["task_ids"], batch["segment_ids"])
    c = loss_coefficients(*keys, mode, normalizers, weights, dtype=torch.float64)
    per_token = torch.rand(batch["labels"].shape, dtype=torch.float64)
    expected = reduce_loss(per_token, *keys, mode, normalizers, weights)
    torch.testing.assert_close((c * per_token).sum(), expected, rtol=1e-12, atol=0)


def one_step_gradients(model, batch, implementation: str, mode: str, tmp_path) -> tuple[float, dict]:
    args = MFTConfig(output_dir=str(tmp_path), weighted_loss_mode=mode, loss_implementation=implementation,
                     loss_chunk_size=7, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                     task_weights={"b": 3.0} if mode in ("case3", "case4") else None)
    trainer = MFTTrainer(model=model, args=args, data_collator=DataCollatorForMFT(pad_token_id=0),
                         train_dataset=Dataset.from_list(make_samples()), tasks=TaskRegistry.from_names("abc"))
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    chunked = trainer._head_loss is not None
    assert chunked == (implementation == "chunked")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_chunked_equals_plain_on_each_family(tmp_path, family):
    """Full fine-tuning: the step loss and every parameter's gradient are the plain path's (float64; float32
    for the mixture-of-experts families, whose grouped matmul has no float64)."""
    config_class, sizes = FAMILIES[family]
    overrides = {**COMMON, **sizes}
    if config_class == "GPTBigCodeConfig":
        overrides.pop("num_hidden_layers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**overrides))
    moe = "moe" in family.lower()
    model = model.to(torch.float32 if moe else torch.float64)
    rtol, atol = (1e-4, 1e-7) if moe else (1e-9, 1e-13)
    batch = padded_batch()
    for mode in ("case1", "case4"):
        plain_loss, plain_grads = one_step_gradients(model, batch, "plain", mode, tmp_path)
        chunked_loss, chunked_grads = one_step_gradients(model, batch, "chunked", mode, tmp_path)
        assert chunked_loss == pytest.approx(plain_loss, rel=1e-6 if moe else 1e-12)
        assert chunked_grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["case2", "case3", "coba"])
def test_trainer_chunked_equals_plain_on_packed_rows(tmp_path, mode):
    model = tiny_llama(64, dtype=torch.float64)
    batch = packed_batch()
    plain_loss, plain_grads = one_step_gradients(model, batch, "plain", "case3" if mode == "coba" else mode, tmp_path)
    chunked_loss, chunked_grads = one_step_gradients(model, batch, "chunked", "case3" if mode == "coba" else mode,
                                                     tmp_path)
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-9, atol=1e-13)


def gemma2_with_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    return Gemma2ForCausalLM(config)


def test_probe_refuses_a_model_that_changes_its_logits(tmp_path):
    """Gemma-2 soft-caps its logits after lm_head: chunked refuses with the reason, auto falls back to plain."""
    model = gemma2_with_softcapping()
    problem = OutputHeadLoss.for_model(model).probe(model, torch.tensor([[1, 2, 3, 4]]))
    assert problem is not None and "changes the output layer's logits" in problem
    batch = padded_batch()
    with pytest.raises(ValueError, match="chunked cannot be used with this model: .*soft-capping"):
        one_step_gradients(model, batch, "chunked", "case1", tmp_path)
    args = MFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = MFTTrainer(model=model, args=args, data_collator=DataCollatorForMFT(pad_token_id=0),
                         train_dataset=Dataset.from_list(make_samples()), tasks=TaskRegistry.from_names("abc"))
    assert args.loss_implementation == "auto"
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert trainer._head_loss is None and torch.isfinite(loss)


def test_lora_on_the_output_layer_is_not_chunked(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(64), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    head, reason = OutputHeadLoss.find_head(model)
    assert head is None and "not a plain torch.nn.Linear" in reason
    plain = get_peft_model(tiny_llama(64), LoraConfig(r=2, target_modules=["q_proj"]))
    assert OutputHeadLoss.find_head(plain)[0] is plain.base_model.model.lm_head


def test_evaluation_with_compute_metrics_gets_real_logits(tmp_path):
    """When the caller wants predictions, evaluation runs the plain path so that logits are logits."""
    model = tiny_llama(64)
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {}

    args = MFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                     per_device_eval_batch_size=8, loss_implementation="chunked")
    samples = Dataset.from_list(make_samples())
    trainer = MFTTrainer(model=model, args=args, data_collator=DataCollatorForMFT(pad_token_id=0),
                         train_dataset=samples, eval_dataset=samples, tasks=TaskRegistry.from_names("abc"),
                         compute_metrics=compute_metrics)
    with_logits = trainer.evaluate()["eval_loss"]
    trainer.compute_metrics = None
    without = trainer.evaluate()["eval_loss"]
    assert seen and seen[0][-1] == 64  # [samples, length, vocab]
    assert trainer._head_loss is not None
    assert without == pytest.approx(with_logits, rel=1e-5)


def test_auto_is_plain_under_torch_compile(tmp_path):
    """The per-call swap of the output layer's forward would make a compiled model recompile every step."""
    model = tiny_llama(64)
    args = MFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, torch_compile=True)
    trainer = MFTTrainer(model=model, args=args, data_collator=DataCollatorForMFT(pad_token_id=0),
                         train_dataset=Dataset.from_list(make_samples()), tasks=TaskRegistry.from_names("abc"))
    assert trainer._output_head_loss(model, dict(padded_batch())) is None


def test_config_rejects_unknown_implementation(tmp_path):
    with pytest.raises(ValueError, match="loss_implementation must be one of auto, chunked, plain"):
        MFTConfig(output_dir=str(tmp_path), loss_implementation="fused")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        MFTConfig(output_dir=str(tmp_path), loss_chunk_size=-1)
