"""Model set-up: the tokenizer and any `AutoModelForCausalLM`, for full fine-tuning, LoRA or QLoRA.

>>> config = ModelConfig(model_name_or_path="Qwen/Qwen2.5-Coder-1.5B", peft_type="lora", lora_rank=64)  # doctest: +SKIP
>>> tokenizer = load_tokenizer(config)                                   # doctest: +SKIP
>>> model = load_model(config, gradient_checkpointing=True)             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .gguf_conversion import converted_gguf_checkpoint, is_gguf_path
from .model_config import ModelConfig
from .modes import PeftType
from .paths import check_local_path
from .segments import padding_token_id

logger = logging.getLogger(__name__)


def resolve_model_path(config: ModelConfig) -> ModelConfig:
    """The config with a .gguf model (or tokenizer) replaced by its converted checkpoint directory
    (converted on first use, then reused while the file is unchanged; mft_trainer.gguf_conversion)."""
    updates = {}
    for name in ("model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(config, name)
        if is_gguf_path(value):
            updates[name] = str(converted_gguf_checkpoint(value))
    return dataclasses.replace(config, **updates) if updates else config


def add_stop_token(model: Any, token_id: int) -> None:
    """List `token_id` in the model's `generation_config.eos_token_id`, so that `generate()` (and
    servers reading the saved generation_config.json) stop at the end of a trained turn."""
    config = model.generation_config
    current = config.eos_token_id
    ids = [] if current is None else [current] if isinstance(current, int) else list(current)
    if token_id not in ids:
        ids.append(token_id)
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
def check_model_paths(config: ModelConfig) -> None:
    """Raise FileNotFoundError for a model or tokenizer path that looks local and does not exist
    (mft_trainer/paths.py), before the hub is asked for it as a model id."""
    check_local_path(config.model_name_or_path, "model_name_or_path")
    check_local_path(config.tokenizer_name_or_path, "tokenizer_name_or_path")


def load_tokenizer(config: ModelConfig) -> Any:
    """Load the tokenizer; one without a pad token pads with its EOS token (as MFTCoder does: padding
    is masked out of attention and loss, so its id never matters).

    Raises:
        FileNotFoundError: a local tokenizer (or model) path that does not exist.
    """
    check_model_paths(config)
    config = resolve_model_path(config)
    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer_name_or_path or config.model_name_or_path, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = padding_token_id(tokenizer)
    return tokenizer


def _quantization_config(config: ModelConfig, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # Storing the 4-bit weights in the compute dtype lets FSDP shard them like other parameters.
        bnb_4bit_quant_storage=dtype,
    )


def load_model(config: ModelConfig, gradient_checkpointing: bool = False, vocab_size: int | None = None) -> Any:
    """Load the base model and, for lora/qlora, wrap it in a PEFT LoRA model.

    Args:
        config: the model settings.
        gradient_checkpointing: prepare a quantized base for checkpointed training (the Trainer turns
            checkpointing itself on from its arguments).
        vocab_size: the tokenizer's size; embeddings are resized only when it exceeds the model's.

    Raises:
        FileNotFoundError: a local model path that does not exist.
    """
    check_model_paths(config)
    config = resolve_model_path(config)
    dtype = config.torch_dtype()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.peft_type == PeftType.QLORA.value:
        kwargs["quantization_config"] = _quantization_config(config, dtype)
    model_config = build_model_config(config)
    if config.random_init:
        if "quantization_config" in kwargs:
            raise ValueError("random_init builds an unquantized model; it cannot be combined with peft_type qlora")
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, config=model_config, **kwargs)

    new_tokens: list[int] = []
    old_size = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > old_size:
        logger.info("resizing the embeddings from %d to %d tokens", old_size, vocab_size)
        model.resize_token_embeddings(vocab_size)
        new_tokens = list(range(old_size, vocab_size))
    if config.peft_type == PeftType.NONE.value:
        freeze_parameters(model, config)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.peft_type == PeftType.QLORA.value:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    dropout = config.lora_dropout
    if dropout > 0 and has_fused_experts(model):
        # PEFT wraps fused expert weights as parameters, which support no dropout; the experts hold
        # most of an MoE model's weights, so adapting them wins over dropout.
        logger.warning("the model's experts are fused parameters, which LoRA adapts without dropout: lora_dropout 0")
        dropout = 0.0
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=dropout,
        # PEFT's "all-linear": every linear layer except the output layer (and, on MoE models, the experts).
        target_modules=config.target_modules or "all-linear",
        task_type="CAUSAL_LM",
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        modules_to_save=config.modules_to_save,
        **new_token_training(model, new_tokens, config.modules_to_save),
    )
    return get_peft_model(model, lora)


def build_model_config(config: ModelConfig) -> Any:
    """The model's config with `model_config_overrides` applied; mixture-of-experts configs return
    their router logits (so that the load-balancing loss is added in training) unless overridden.

    Raises:
        ValueError: an override that is not a field of this model's config.
    """
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    overrides = dict(config.model_config_overrides or {})
    known = set(model_config.to_dict()) | set(dir(model_config))
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        listed = ", ".join(f"{k}" + (f" (did you mean {hints[k][0]}?)" if hints[k] else "") for k in unknown)
        raise ValueError(f"model_config_overrides: {type(model_config).__name__} has no field {listed}")
    for key, value in overrides.items():
        setattr(model_config, key, value)
    if hasattr(model_config, "output_router_logits") and "output_router_logits" not in overrides:
        if not model_config.output_router_logits:
            logger.info("mixture of experts: output_router_logits on, so that the router's load-balancing loss "
                        "(router_aux_loss_coef %s) is added in training", getattr(model_config, "router_aux_loss_coef", None))
        model_config.output_router_logits = True
    return model_config


def new_token_training(model: Any, new_tokens: list[int], modules_to_save: list[str] | None) -> dict[str, Any]:
    """LoraConfig arguments that train the embedding rows of tokens added to the vocabulary (custom role
    markers, say): LoRA alone would leave them at their random initialisation. PEFT's trainable token
    indices train those rows only; with untied embeddings the output layer's rows too."""
    if not new_tokens:
        return {}
    saved = set(modules_to_save or [])
    embedding_name = _module_name(model, model.get_input_embeddings())
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    if embedding_name.split(".")[-1] in saved:
        return {}  # the whole embedding trains already
    indices = {embedding_name.split(".")[-1]: new_tokens}
    if output is not None and not tied and _module_name(model, output).split(".")[-1] not in saved:
        indices[_module_name(model, output).split(".")[-1]] = new_tokens
    logger.info("%d tokens were added to the vocabulary: their rows of %s train beside the adapters",
                len(new_tokens), " and ".join(indices))
    return {"trainable_token_indices": indices}


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def freeze_parameters(model: torch.nn.Module, config: ModelConfig) -> int:
    """Full fine-tuning: freeze the embeddings, the first N layers and parameters matching
    `freeze_modules`, as configured; returns the number of frozen parameter tensors.

    Raises:
        ValueError: more layers to freeze than the model has, or a pattern that matches nothing.
    """
    frozen: set[str] = set()
    names = dict(model.named_parameters())
    if config.freeze_embeddings:
        embedding = model.get_input_embeddings().weight
        frozen |= {n for n, p in names.items() if p is embedding}
    if config.freeze_first_layers:
        layers = next((m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)), None)
        if layers is None or config.freeze_first_layers > len(layers):
            count = 0 if layers is None else len(layers)
            raise ValueError(f"freeze_first_layers {config.freeze_first_layers}: the model has {count} layers")
        for layer in list(layers)[: config.freeze_first_layers]:
            frozen |= {n for n, p in names.items() if any(p is q for q in layer.parameters())}
    for pattern in config.freeze_modules or []:
        matched = {n for n in names if re.search(pattern, n)}
        if not matched:
            raise ValueError(f"freeze_modules: {pattern!r} matches no parameter (e.g. {next(iter(names))!r})")
        frozen |= matched
    for name in frozen:
        names[name].requires_grad_(False)
    if frozen:
        logger.info("frozen: %d parameter tensors (%s parameters)", len(frozen),
                    f"{sum(names[n].numel() for n in frozen):,}")
    return len(frozen)


def keep_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers in their training format on the CPU; returns the number of
    4-bit layers (0 for a model without any).

    On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a `Linear4bit` layer's weight, the first
    time the layer runs in eval mode without gradients, to a format for inference only, and keeps
    it. Training forwards after that go through a kernel that passes no gradient to the layer's
    input, so the LoRA weights of every earlier layer get a wrong gradient (a layer with a bias,
    as in Qwen2, fails instead). Training runs such forwards: evaluation, and MFTTrainer's probe of
    the output layer at the first step. So the conversion is turned off, and undone where it has
    already happened (bitsandbytes' own inverse, which it uses before moving a layer to a GPU).

    >>> keep_4bit_weights_trainable(model)  # MFTTrainer calls it on the model it trains  # doctest: +SKIP
    """
    layers = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        layers += 1
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return layers


def has_fused_experts(model: torch.nn.Module) -> bool:
    """Whether the model keeps mixture-of-experts weights as fused 3-D parameters (transformers 5's
    Mixtral, Qwen-MoE, DeepSeek-V3), which PEFT adapts through parameter wrappers."""
    return any(p.dim() > 2 for p in model.parameters())


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
