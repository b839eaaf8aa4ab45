"""Model set-up: full, LoRA and QLoRA (4-bit NF4 through bitsandbytes on the CPU), tokenizer pad."""

import pytest
import torch

from mft_trainer.model_config import ModelConfig
from mft_trainer.modeling import (
    keep_4bit_weights_trainable,
    load_model,
    load_tokenizer,
    trainable_parameters,
)

from .conftest import TOKENIZER_DIR
from .helpers import tiny_llama


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(128, seed=0).save_pretrained(path)
    return str(path)


def test_full_fine_tuning_loads_the_plain_model(base_dir):
    model = load_model(ModelConfig(model_name_or_path=base_dir, dtype="float32"))
    trainable, total = trainable_parameters(model)
    assert trainable == total > 0
    assert type(model).__name__ == "LlamaForCausalLM"


def test_lora_targets_every_linear_layer_but_the_lm_head(base_dir):
    model = load_model(ModelConfig(model_name_or_path=base_dir, peft_type="lora", lora_rank=4, lora_alpha=8))
    lora_modules = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert lora_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in n for n in trainable_names)
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8


def test_lora_target_modules_can_be_chosen(base_dir):
    model = load_model(ModelConfig(model_name_or_path=base_dir, peft_type="lora", target_modules=["q_proj", "v_proj"]))
    lora_modules = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert lora_modules == {"q_proj", "v_proj"}


def test_qlora_quantizes_the_base_to_4bit_and_trains(base_dir):
    pytest.importorskip("bitsandbytes")
    model = load_model(ModelConfig(model_name_or_path=base_dir, peft_type="qlora", dtype="float32", lora_rank=4),
                       gradient_checkpointing=True)
    linear_types = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj.base_layer")}
    assert linear_types == {"Linear4bit"}
    quant = model.base_model.model.config.quantization_config
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    ids = torch.randint(0, 128, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.fixture(scope="module")
def base_dir_64(tmp_path_factory):
    """Hidden size 64: bitsandbytes' CPU inference format needs a full 64-value quantization block."""
    path = tmp_path_factory.mktemp("base64")
    tiny_llama(128, seed=0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return str(path)


def qlora_gradients(base_dir, steps):
    """The LoRA gradients of one training forward of a QLoRA model, after `steps(model)`."""
    torch.manual_seed(0)
    model = load_model(ModelConfig(model_name_or_path=base_dir, peft_type="qlora", dtype="float32", lora_rank=4))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that every LoRA weight has a gradient
            torch.nn.init.normal_(parameter, std=0.05)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    steps(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def evaluate_a_few_tokens(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(4)[None])


@pytest.mark.parametrize("order", ["guard, then eval forward", "eval forward, then guard"])
def test_qlora_gradients_are_unchanged_by_an_eval_forward_before_training(base_dir_64, order):
    """On a CPU with AVX512-BF16, bitsandbytes switches a 4-bit layer to an inference-only format at its
    first eval-mode forward without gradients; training after it (MFTTrainer probes the model, and
    evaluates, that way) gave LoRA gradients off by up to 0.3. keep_4bit_weights_trainable prevents
    the switch, or undoes it. (A CPU without AVX512-BF16 never switches, and passes either way.)"""
    pytest.importorskip("bitsandbytes")
    expected = qlora_gradients(base_dir_64, lambda model: None)

    def steps(model):
        if order.startswith("guard"):
            assert keep_4bit_weights_trainable(model) == 14  # 7 linear layers x 2 blocks
            # What keeps the layers trainable on any CPU (this one may lack AVX512-BF16 and never switch).
            assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
        evaluate_a_few_tokens(model)
        if order.startswith("eval"):
            keep_4bit_weights_trainable(model)

    got = qlora_gradients(base_dir_64, steps)
    assert got.keys() == expected.keys() and len(got) == 28
    # Undoing is bitsandbytes' best-effort inverse: the quantization scales come back rounded to bf16.
    rtol, atol = (1e-5, 1e-7) if order.startswith("guard") else (1e-2, 1e-3)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_embeddings_are_resized_only_when_the_tokenizer_is_larger(base_dir):
    same = load_model(ModelConfig(model_name_or_path=base_dir), vocab_size=100)
    assert same.get_input_embeddings().num_embeddings == 128
    bigger = load_model(ModelConfig(model_name_or_path=base_dir), vocab_size=130)
    assert bigger.get_input_embeddings().num_embeddings == 130


def test_random_init_builds_from_the_config_alone(tmp_path, base_dir):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(base_dir).save_pretrained(tmp_path)  # config.json only, no weights
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path), random_init=True))
    assert model.config.vocab_size == 128


def test_tokenizer_without_pad_pads_with_eos():
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path="unused", tokenizer_name_or_path=str(TOKENIZER_DIR)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


@pytest.mark.parametrize("kwargs,message", [
    ({}, "model_name_or_path is required"),
    ({"model_name_or_path": "m", "peft_type": "adapter"}, "peft_type must be one of"),
    ({"model_name_or_path": "m", "quantization": "4bit"}, "needs peft_type qlora"),
    ({"model_name_or_path": "m", "peft_type": "qlora", "quantization": "2bit"}, "4bit or 8bit"),
    ({"model_name_or_path": "m", "dtype": "fp8"}, "dtype must be"),
    ({"model_name_or_path": "m", "lora_rank": 0}, "lora_rank"),
])
def test_model_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig(model_name_or_path="m").trust_remote_code is False


def test_mft_trainer_keeps_a_qlora_model_trainable_through_evaluation(base_dir_64, tmp_path):
    """MFTTrainer evaluates (and probes its model at the first step) in eval mode without gradients:
    afterwards every 4-bit layer must still be in its training format. (With gradient checkpointing
    the embeddings' output requires grad even then, which also stops the switch: so, off here.)"""
    pytest.importorskip("bitsandbytes")
    from datasets import Dataset

    from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
    from mft_trainer.collator import DataCollatorForMFT

    model = load_model(ModelConfig(model_name_or_path=base_dir_64, peft_type="qlora", dtype="float32", lora_rank=4))
    samples = [{"input_ids": list(range(5, 17)), "labels": [-100] * 4 + list(range(9, 17)), "task_id": 0}] * 2
    trainer = MFTTrainer(model=model, args=MFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                     disable_tqdm=True, max_steps=1, gradient_checkpointing=False),
                         train_dataset=Dataset.from_list(samples), eval_dataset=Dataset.from_list(samples),
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names(["a"]))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 14
    assert not any(m.support_avx512bf16_for_cpu for m in layers)  # fails without the guard on any CPU
    trainer.evaluate()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    trainer.train()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


# ---- model config overrides, MoE router logits, PEFT options, freezing (issue 16) ------------------


def save_tiny_mixtral(path, **config):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, **config)).save_pretrained(path)
    return path


def test_model_config_overrides_reach_the_model_and_unknown_fields_are_named(tmp_path):
    tiny_llama(64).save_pretrained(tmp_path)
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path), dtype="float32",
                                   model_config_overrides={"attention_dropout": 0.25, "rms_norm_eps": 1e-3}))
    assert model.config.attention_dropout == 0.25 and model.config.rms_norm_eps == 1e-3
    with pytest.raises(ValueError, match=r"LlamaConfig has no field atention_dropout \(did you mean attention_dropout"):
        load_model(ModelConfig(model_name_or_path=str(tmp_path), model_config_overrides={"atention_dropout": 0.1}))
    with pytest.raises(ValueError, match="must be a mapping"):
        ModelConfig(model_name_or_path="x", model_config_overrides=[1])


def micro_batch_aux_reference(model, batches, coefficient):
    """The step loss by hand: token-mean CE over all the step's tokens (exact), plus the router loss
    as transformers computes it per forward, averaged over the micro-batches."""
    labels = torch.cat([b["labels"][:, 1:].reshape(-1) for b in batches])
    logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                        .reshape(-1, 64) for b in batches])
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (labels != -100).sum()
    aux = sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).aux_loss for b in batches)
    return ce + coefficient * aux / len(batches)


@pytest.mark.parametrize("batch_size,accumulation", [(4, 1), (2, 2)])
def test_moe_models_add_the_router_loss_by_default_exactly_across_accumulation(tmp_path, batch_size, accumulation):
    """Mixtral's published config has output_router_logits false; training turns it on, and the step's
    gradient is the exact token-mean CE plus router_aux_loss_coef times the mean router loss."""
    from datasets import Dataset

    from mft_trainer import DataCollatorForMFT, MFTConfig, MFTTrainer, TaskRegistry

    from .distributed.one_step import make_samples

    save_tiny_mixtral(tmp_path / "base", output_router_logits=False)
    config = ModelConfig(model_name_or_path=str(tmp_path / "base"), dtype="float32",
                         model_config_overrides={"router_aux_loss_coef": 0.5})
    model = load_model(config)
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.5
    samples = make_samples()[:4]
    collate = DataCollatorForMFT(pad_token_id=0)
    reference_model = load_model(config).train()
    batches = [collate(samples[i:i + batch_size]) for i in range(0, 4, batch_size)]
    reference = micro_batch_aux_reference(reference_model, batches, 0.5)
    reference.backward()
    expected = {n: -p.grad for n, p in reference_model.named_parameters() if p.grad is not None}

    args = MFTConfig(output_dir=str(tmp_path / "run"), weighted_loss_mode="case1", per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                     lr_scheduler_type="constant", max_grad_norm=0, report_to=[], use_cpu=True, save_strategy="no",
                     loss_implementation="plain", activation_checkpointing=False, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(samples), data_collator=collate,
                         tasks=TaskRegistry.from_names(["a", "b", "c"]))
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    for name, value in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach() - before[name], value,
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    router = [n for n in expected if "gate" in n and "expert" not in n]
    assert router and all(expected[n].abs().sum() > 0 for n in router)


def test_the_mixtral_recipe_trains_with_the_router_loss(tmp_path):
    """The shipped Mixtral recipe, with a tiny Mixtral (published-style config: router logits off) in
    place of the 8x7B: its QLoRA model returns the router loss in training, at the recipe's coefficient."""
    from mft_trainer.recipe import parse_recipe

    from .conftest import REPO

    save_tiny_mixtral(tmp_path / "base", output_router_logits=False)
    recipe = parse_recipe([str(REPO / "examples/recipes/mixtral-8x7b-qlora-zero2.yaml"), "--use_cpu",
                           "--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(tmp_path / "run")])
    assert recipe.model.peft_type == "qlora"
    model = load_model(recipe.model).train()
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.02
    x = torch.tensor([[1, 5, 9, 3, 7]])
    out = model(input_ids=x, labels=x)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_router_logits_stay_off_when_overridden(tmp_path):
    save_tiny_mixtral(tmp_path, output_router_logits=False)
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path), model_config_overrides={"output_router_logits": False}))
    assert model.config.output_router_logits is False


def test_dora_rslora_and_modules_to_save_reach_peft(tmp_path):
    tiny_llama(64).save_pretrained(tmp_path)
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path), peft_type="lora", lora_rank=4, use_dora=True,
                                   use_rslora=True, modules_to_save=["lm_head"], dtype="float32"))
    lora = model.peft_config["default"]
    assert lora.use_dora and lora.use_rslora and set(lora.modules_to_save) >= {"lm_head"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA's magnitudes
    assert any("lm_head.modules_to_save" in n for n in trainable)
    with pytest.raises(ValueError, match="use_dora apply to peft_type lora or qlora"):
        ModelConfig(model_name_or_path="x", use_dora=True)


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_the_rows_of_added_tokens(tmp_path, tied):
    """Tokens added to the vocabulary (role markers, say) get trained rows beside the adapters; the
    rows of the old vocabulary stay frozen."""
    tiny_llama(64, tie_word_embeddings=tied).save_pretrained(tmp_path)
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path), peft_type="lora", lora_rank=4, dtype="float32"),
                       vocab_size=66)
    x = torch.tensor([[1, 64, 65, 3]])
    model(input_ids=x, labels=x).loss.backward()
    deltas = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == (1 if tied else 2)  # the input rows; untied: the output layer's rows too
    assert all(p.shape == (2, 32) and p.grad.abs().sum() > 0 for p in deltas.values())
    assert not model.get_input_embeddings().token_adapter.base_layer.weight.requires_grad


def test_freezing_for_full_fine_tuning(tmp_path):
    tiny_llama(64).save_pretrained(tmp_path)
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path), freeze_embeddings=True, freeze_first_layers=1,
                                   freeze_modules=[r"layers\.1\.self_attn\.q_proj"]))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert {n for n in dict(model.named_parameters()) if n.startswith("model.layers.0.")} <= frozen
    assert "model.layers.1.self_attn.q_proj.weight" in frozen
    assert "model.layers.1.self_attn.k_proj.weight" not in frozen and "lm_head.weight" not in frozen
    with pytest.raises(ValueError, match="matches no parameter"):
        load_model(ModelConfig(model_name_or_path=str(tmp_path), freeze_modules=["nothing_like_this"]))
    with pytest.raises(ValueError, match="the model has 2 layers"):
        load_model(ModelConfig(model_name_or_path=str(tmp_path), freeze_first_layers=3))
    with pytest.raises(ValueError, match="apply to full fine-tuning"):
        ModelConfig(model_name_or_path="x", peft_type="lora", freeze_embeddings=True)
