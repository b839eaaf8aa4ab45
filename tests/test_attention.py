"""Packed rows give the logits and per-sample losses of the samples alone, for every backend that
claims to honour packing; a leaky layout is caught; the torch_varlen plumbing and the model check."""

import os

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import create_causal_mask  # noqa: F401  (makes LeakyLlama pass the static check)

from mft_trainer import attention
from mft_trainer.attention import (
    PackingError,
    cu_seq_lens_from_starts,
    default_attn_implementation,
    reference_varlen_attention,
)
from mft_trainer.packing_guard import check_packing_support, is_packed_batch, probe_packing
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.losses import per_token_cross_entropy
from mft_trainer.packing import best_fit_decreasing

from .distributed.one_step import VOCAB, make_samples
from .helpers import tiny_llama


def tiny_qwen2(vocab_size: int, seed: int = 0, dtype=None, **overrides):
    """A 2-layer Qwen2 (biased q/k/v projections) with random weights, built from a config."""
    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config))
    return model.to(dtype) if dtype is not None else model


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def packed_batch(samples, capacity=24, mode="pack"):
    """The samples packed best-fit into rows (as the dataset does) and collated; returns the batch
    and, for each segment id, the index of its sample."""
    bins = best_fit_decreasing([len(s["input_ids"]) for s in samples], capacity, seed=0)
    rows, order = [], []
    for b in bins:
        rows.append({
            "input_ids": [t for i in b for t in samples[i]["input_ids"]],
            "labels": [t for i in b for t in samples[i]["labels"]],
            "task_ids": [samples[i]["task_id"] for i in b for _ in samples[i]["input_ids"]],
            "position_ids": [p for i in b for p in range(len(samples[i]["input_ids"]))],
        })
        order += b
    assert len(bins) < len(samples)  # rows really hold several samples
    return DataCollatorForMFT(pad_token_id=0, padding_mode=mode)(rows), order


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "task_ids", "segment_ids")}


def alone(model, samples):
    """Logits and per-token losses of each sample run on its own."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            logits = model(input_ids=ids, use_cache=False).logits
            out.append((logits[0], per_token_cross_entropy(logits, torch.tensor([s["labels"]]))[0]))
    return out


def max_segment_error(logits, batch, order, reference):
    """Max |difference| between each packed segment and its sample alone, over logits and over the
    per-sample loss (the sum of its token losses, what every loss mode is built from)."""
    per_token = per_token_cross_entropy(logits, batch["labels"])
    worst = 0.0
    for segment, sample in enumerate(order):
        at = batch["segment_ids"] == segment
        ref_logits, ref_loss = reference[sample]
        worst = max(worst, (logits[at] - ref_logits).abs().max().item())
        worst = max(worst, (per_token[at].sum() - ref_loss.sum()).abs().item())
    return worst


@pytest.mark.parametrize("attn", ["sdpa", "eager", "torch_varlen"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_give_the_logits_and_losses_of_samples_alone(arch, attn):
    # float64; eager's softmax runs in float32 whatever the dtype, hence its looser tolerance.
    tolerance = 1e-6 if attn == "eager" else 1e-10
    model = MODELS[arch](VOCAB, seed=0, dtype=torch.float64).eval()
    model.set_attn_implementation(attn)
    samples = make_samples()
    reference = alone(model, samples)
    for mode in ("pack", "padding_free"):
        batch, order = packed_batch(samples, mode=mode)
        with torch.no_grad():
            logits = model(**model_inputs(batch), use_cache=False).logits
        assert max_segment_error(logits, batch, order, reference) < tolerance, mode


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_leaky_layouts_are_caught(arch):
    """The comparison above fails when positions are not reset, or when an attention_mask is passed
    (transformers then builds a plain causal mask, and samples see each other)."""
    model = MODELS[arch](VOCAB, seed=0, dtype=torch.float64).eval()
    samples = make_samples()
    reference = alone(model, samples)
    batch, order = packed_batch(samples)
    inputs = model_inputs(batch)
    not_reset = dict(inputs, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    with_mask = dict(inputs, attention_mask=torch.ones_like(batch["input_ids"]))
    with torch.no_grad():
        for leaky in (not_reset, with_mask):
            logits = model(**leaky, use_cache=False).logits
            assert max_segment_error(logits, batch, order, reference) > 1e-3


@pytest.mark.skipif(not os.environ.get("MFT_SLOW_TESTS"),
                    reason="flex_attention compiles per shape on CPU (~30 s); set MFT_SLOW_TESTS=1")
def test_flex_attention_packed_forward():
    """flex_attention on CPU runs forward only (no backward) and in float32 at most."""
    model = tiny_llama(VOCAB, seed=0, dtype=torch.float32).eval()
    samples = make_samples()
    reference = alone(model, samples)  # sdpa
    model.set_attn_implementation("flex_attention")
    batch, order = packed_batch(samples)
    with torch.no_grad():
        logits = model(**model_inputs(batch), use_cache=False).logits
    assert max_segment_error(logits, batch, order, reference) < 1e-4


def test_torch_varlen_honours_sliding_windows():
    """A Qwen2 whose layers all use a 4-token sliding window: torch_varlen equals sdpa's mask."""
    model = tiny_qwen2(VOCAB, dtype=torch.float64, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    model.eval()
    batch, _ = packed_batch(make_samples())
    with torch.no_grad():
        sdpa = model(**model_inputs(batch), use_cache=False).logits
        model.set_attn_implementation("torch_varlen")
        varlen = model(**model_inputs(batch), use_cache=False).logits
        no_window = tiny_qwen2(VOCAB, dtype=torch.float64).eval()(**model_inputs(batch), use_cache=False).logits
    torch.testing.assert_close(varlen, sdpa, rtol=1e-9, atol=1e-10)
    assert (no_window - sdpa).abs().max() > 1e-3  # the window matters on these samples


def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """Stands in for torch >= 2.11's CUDA-only varlen_attn: checks the call, computes the reference."""
    CALLS.append(dict(dtype=query.dtype, cu=cu_seq_q.clone(), max_q=max_q, window=window_size, gqa=enable_gqa,
                      heads=(query.shape[1], key.shape[1])))
    assert cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
    q, k, v = query.double(), key.double(), value.double()
    out = reference_varlen_attention(q, k, v, cu_seq_q, cu_seq_k, scale, window_left=window_size[0])
    return out.to(query.dtype)


def fake_varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None,
                          scale=None):
    """torch 2.10's signature: is_causal instead of window_size, no grouped-query attention."""
    CALLS.append(dict(dtype=query.dtype, cu=cu_seq_q.clone(), max_q=max_q, causal=is_causal,
                      heads=(query.shape[1], key.shape[1])))
    out = reference_varlen_attention(query.double(), key.double(), value.double(), cu_seq_q, cu_seq_k, scale)
    return out.to(query.dtype)


CALLS: list = []


@pytest.mark.parametrize("kernel", [fake_varlen_attn, fake_varlen_attn_2_10])
def test_torch_varlen_calls_the_kernel_with_the_batch_boundaries(monkeypatch, kernel):
    """The CUDA path, on CPU: the kernel gets the collator's cu_seq_lens and max length, half-precision
    inputs, causal masking and grouped-query heads in the form its torch version takes."""
    monkeypatch.setattr(attention, "_torch_varlen_attn", kernel)
    monkeypatch.setattr(attention, "_use_kernel", lambda query: True)
    CALLS.clear()
    model = tiny_llama(VOCAB, seed=0, dtype=torch.float32).eval()
    samples = make_samples()
    batch, order = packed_batch(samples)
    with torch.no_grad():
        sdpa = model(**model_inputs(batch), use_cache=False).logits
        model.set_attn_implementation("torch_varlen")
        varlen = model(**model_inputs(batch), use_cache=False).logits
    assert len(CALLS) == 2  # one per layer
    for call in CALLS:
        assert call["dtype"] == torch.bfloat16  # float32 is cast for the kernel
        assert torch.equal(call["cu"], batch["cu_seq_lens_q"]) and call["max_q"] == batch["max_length_q"]
        if kernel is fake_varlen_attn:
            assert call["window"] == (-1, 0) and call["gqa"] and call["heads"] == (4, 2)
        else:
            assert call["causal"] and call["heads"] == (4, 4)  # key/value heads repeated for the old kernel
    # bfloat16 attention: close to float32 sdpa, and nowhere near a leak.
    assert (varlen - sdpa).abs().max() < 2e-2
    model.set_attn_implementation("sdpa")
    reference = alone(model, samples)
    assert max_segment_error(varlen, batch, order, reference) < 2e-2


def test_cu_seq_lens_are_the_sequence_starts_over_the_flattened_batch():
    starts = torch.tensor([[True, False, True, False], [True, False, False, True]])
    cu_seq_lens = cu_seq_lens_from_starts(starts)
    assert cu_seq_lens.tolist() == [0, 2, 4, 7, 8] and cu_seq_lens.dtype == torch.int32


def test_torch_varlen_derives_boundaries_without_cu_seq_lens():
    """Without cu_seq_lens (a padded batch, or DataCollatorWithFlattening) a sequence starts at every
    row start and wherever position_ids is 0; a right-padded batch is then exact for real tokens."""
    model = tiny_llama(VOCAB, seed=0, dtype=torch.float64).eval()
    batch = DataCollatorForMFT(pad_token_id=0)(make_samples())
    with torch.no_grad():
        sdpa = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        model.set_attn_implementation("torch_varlen")
        varlen = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        packed, order = packed_batch(make_samples())
        no_cu = {k: v for k, v in model_inputs(packed).items() if not k.startswith(("cu_seq", "max_length"))}
        from_positions = model(**no_cu, use_cache=False).logits
        with_cu = model(**model_inputs(packed), use_cache=False).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(varlen[real], sdpa[real], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(from_positions, with_cu, rtol=0, atol=0)


def test_torch_varlen_refuses_generation_with_a_cache():
    model = tiny_llama(VOCAB, seed=0).eval()
    model.set_attn_implementation("torch_varlen")
    with torch.no_grad():
        first = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        with pytest.raises(PackingError, match="generate with attn_implementation 'sdpa'"):
            model(input_ids=torch.tensor([[4]]), cache=first.cache, use_cache=True)


# ------------------------------------------------------------------------------ choosing and checking


def test_default_backend_on_cpu_is_sdpa():
    for mode in ("padding", "pack", "padding_free", "concat"):
        assert default_attn_implementation(mode, device="cpu") == "sdpa"


@pytest.mark.parametrize("attn", ["sdpa", "eager", "torch_varlen"])
def test_check_accepts_models_that_honour_packing(attn):
    model = tiny_qwen2(VOCAB)
    model.set_attn_implementation(attn)
    assert check_packing_support(model, "pack") == attn
    assert probe_packing(model).ok
    assert model.training  # the probe restores the training mode


class LeakyLlama(LlamaForCausalLM):
    """Passes the static checks, but drops position_ids: its packed samples see each other."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_check_rejects_models_that_would_leak():
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(PackingError, match="takes no position_ids"):
        check_packing_support(bloom, "padding_free")
    check_packing_support(bloom, "padding")  # padding is always fine

    leaky = LeakyLlama(tiny_llama(VOCAB).config)
    assert not probe_packing(leaky).ok
    with pytest.raises(PackingError, match="lets packed samples see each other"):
        check_packing_support(leaky, "pack")
    check_packing_support(leaky, "pack", probe=False)  # the static checks alone cannot see it

    llama = tiny_llama(VOCAB)
    llama.config._attn_implementation = "paged|eager"
    with pytest.raises(PackingError, match="'paged|eager' of LlamaForCausalLM is not known to keep packed samples"):
        check_packing_support(llama, "pack")


def test_packed_batches_are_told_by_what_they_carry():
    samples = make_samples()
    assert not is_packed_batch(DataCollatorForMFT(pad_token_id=0)(samples))  # an attention_mask
    for mode in ("pack", "padding_free"):
        assert is_packed_batch(packed_batch(samples, mode=mode)[0])
    batch, _ = packed_batch(samples)
    without = {key: value for key, value in batch.items() if not key.startswith(("cu_seq_lens", "max_length"))}
    assert is_packed_batch(without)  # position_ids restart inside a row
    counting = dict(without, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    assert is_packed_batch(counting)  # positions not reset, but several samples in a row
    one_per_row = {key: value for key, value in DataCollatorForMFT(pad_token_id=0)(samples).items()
                   if key != "attention_mask"}
    assert not is_packed_batch(one_per_row)  # one sample (and its padding) per row
