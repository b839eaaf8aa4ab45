"""The model families MFTCoder users train, as tiny random models: LoRA on all linear layers, two
MFTTrainer steps each, a finite per-task loss, and only adapter weights updated."""

import pytest
import torch
import transformers
from datasets import Dataset

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.model_config import ModelConfig
from mft_trainer.modeling import load_model

from .distributed.one_step import make_samples

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2)
ATTENTION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)

FAMILIES = {
    "llama (CodeLlama, DeepSeek-Coder)": ("LlamaConfig", ATTENTION),
    "mistral": ("MistralConfig", ATTENTION),
    "mixtral (MoE)": ("MixtralConfig", {**ATTENTION, "num_local_experts": 4, "num_experts_per_tok": 2,
                                        "output_router_logits": True}),
    "qwen2 (Qwen2.5-Coder)": ("Qwen2Config", ATTENTION),
    "qwen2_moe": ("Qwen2MoeConfig", {**ATTENTION, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                                     "output_router_logits": True}),
    "starcoder2": ("Starcoder2Config", ATTENTION),
    "gpt_bigcode (StarCoder)": ("GPTBigCodeConfig", {"n_embd": 32, "n_head": 4, "n_layer": 2, "n_inner": 64}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}),
    "deepseek_v3 (MoE)": ("DeepseekV3Config", {**ATTENTION, "num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4,
                                               "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                                               "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
                                               "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_training_steps_on_family(tmp_path, family):
    config_class, sizes = FAMILIES[family]
    overrides = {**COMMON, **sizes}
    if config_class == "GPTBigCodeConfig":
        overrides.pop("num_hidden_layers")
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**overrides)
    base = transformers.AutoModelForCausalLM.from_config(config)
    base.save_pretrained(tmp_path / "base")
    model = load_model(ModelConfig(model_name_or_path=str(tmp_path / "base"), peft_type="lora", lora_rank=4,
                                   dtype="float32"))
    lora_layers = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert lora_layers, "LoRA found no linear layer"
    assert not any("lm_head" in name for name in lora_layers)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    args = MFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                     learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     disable_tqdm=True)
    trainer = MFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(make_samples()),
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names("abc"))
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert any(k.startswith("loss/") for k in logged[0])
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen_before.items())  # the base stays frozen
    assert any(not torch.equal(params[n], v) for n, v in trained_before.items())  # the adapters moved
