"""Model set-up: the tokenizer and any `AutoModelForCausalLM`, for full fine-tuning, LoRA or QLoRA.

>>> config = ModelConfig(model_name_or_path="Qwen/Qwen2.5-Coder-1.5B", peft_type="lora", lora_rank=64)
>>> tokenizer = load_tokenizer(config)                                   # doctest: +SKIP
>>> model = load_model(config, gradient_checkpointing=True)             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .gguf_conversion import converted_gguf_checkpoint, is_gguf_path
from .json_settings import parse_json_text
from .paths import check_local_path
from .segments import padding_token_id

logger = logging.getLogger(__name__)


class PeftType(str, Enum):
    NONE = "none"  # full fine-tuning
    LORA = "lora"
    QLORA = "qlora"  # LoRA over a 4-bit (NF4) or 8-bit quantized base


# The weight dtypes a setting may name (training's ModelConfig.dtype, scripts' --dtype), with their
# short spellings; "auto" is left to the caller (the checkpoint's dtype, or the device's best).
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """`"auto"`, a torch dtype, or a dtype's name (float32, bfloat16, float16, or fp32, bf16, fp16).

    >>> resolve_dtype("bf16"), resolve_dtype("auto")
    (torch.bfloat16, 'auto')

    Raises:
        ValueError: any other name, with the names accepted.
    """
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype must be one of {', '.join(DTYPE_CHOICES)} (or fp32, bf16, fp16), got {dtype!r}"
        ) from None


@dataclass
class ModelConfig:
    """Which model to train and how: full fine-tuning, LoRA or QLoRA. Each field's `help` is what
    `--help` shows. Defaults follow MFTCoder (LoRA rank 96, alpha 32, dropout 0.05, all linear layers)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Path (or hub id) of the base model; any AutoModelForCausalLM. A .gguf file is converted once "
            "into a trainable checkpoint (cached in ~/.cache/mft_trainer/gguf, or $MFT_TRAINER_CACHE/gguf)."
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer path; default model_name_or_path."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), bfloat16, float16, float32."
        },
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={
            "help": "Attention backend: sdpa, eager, flex_attention, flash_attention_2, or torch_varlen (torch's own "
            "FlashAttention varlen kernel, for packed batches on CUDA). Default: picked for the device and "
            "padding_mode (docs/packing.md)."
        },
    )
    model_config_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": "Model config fields to set before the model is built, e.g. {rope_scaling: {rope_type: yarn, "
            "factor: 4.0}, attention_dropout: 0.1, router_aux_loss_coef: 0.02}. Mixture-of-experts models return "
            "their router logits in training unless this sets output_router_logits: false, so that the router's "
            "load-balancing loss is added."
        },
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Build the model from the config at model_name_or_path with random weights instead of loading "
            "weights (demos, tests, benchmarks)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code shipped with the checkpoint. Off unless you trust it."}
    )
    peft_type: str = field(
        default="none", metadata={"help": "none (full fine-tuning), lora, or qlora (LoRA over a quantized base)."}
    )
    quantization: Optional[str] = field(
        default=None, metadata={"help": "qlora base quantization: 4bit (NF4, double quant; default) or 8bit."}
    )
    lora_rank: int = field(default=96, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules that get LoRA adapters; default all linear layers except the LM head."},
    )
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: LoRA with a trained magnitude per output (weight-decomposed)."}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rsLoRA: scale the adapters by alpha / sqrt(r) instead of alpha / r."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules trained in full beside the adapters and saved with them, e.g. [lm_head, embed_tokens]."
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={"help": "Full fine-tuning: keep the input embeddings (and a tied output layer) frozen."},
    )
    freeze_first_layers: int = field(
        default=0, metadata={"help": "Full fine-tuning: keep the first N transformer layers frozen."}
    )
    freeze_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Full fine-tuning: keep frozen every parameter whose name matches one of these regular "
            "expressions (re.search), e.g. ['self_attn', 'layers\\.(0|1)\\.']."
        },
    )

    # A list and a mapping that HfArgumentParser passes as JSON text (the fields are typed `X | str | None`
    # for it: mft_trainer/json_settings.py).
    _JSON_FIELDS = ("model_config_overrides", "target_modules")

    def __post_init__(self) -> None:
        for name in self._JSON_FIELDS:
            setattr(self, name, parse_json_text(name, getattr(self, name)))
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the path (or hub id) of the base model")
        try:
            self.peft_type = PeftType(str(self.peft_type or "none").lower()).value
        except ValueError:
            raise ValueError(f"peft_type must be one of {[p.value for p in PeftType]}, got {self.peft_type!r}") from None
        resolve_dtype(self.dtype)  # a name that is no dtype fails here, before anything loads
        if self.peft_type == PeftType.QLORA.value:
            self.quantization = self.quantization or "4bit"
            if self.quantization not in ("4bit", "8bit"):
                raise ValueError(f"quantization must be 4bit or 8bit, got {self.quantization!r}")
        elif self.quantization is not None:
            raise ValueError(f"quantization={self.quantization!r} needs peft_type qlora (peft_type is {self.peft_type})")
        if self.lora_rank <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_rank and lora_alpha must be > 0 and lora_dropout in [0, 1)")
        if self.model_config_overrides is not None and not isinstance(self.model_config_overrides, dict):
            raise ValueError(
                f"model_config_overrides must be a mapping of config fields, e.g. {{attention_dropout: 0.1}}, "
                f"got {self.model_config_overrides!r}"
            )
        lora_only = [n for n in ("use_dora", "use_rslora", "modules_to_save") if getattr(self, n)]
        if lora_only and self.peft_type == PeftType.NONE.value:
            raise ValueError(f"{', '.join(lora_only)} apply to peft_type lora or qlora (peft_type is none)")
        freezing = [n for n in ("freeze_embeddings", "freeze_first_layers", "freeze_modules") if getattr(self, n)]
        if freezing and self.peft_type != PeftType.NONE.value:
            raise ValueError(
                f"{', '.join(freezing)} apply to full fine-tuning (peft_type none); with {self.peft_type} the base "
                "model is frozen already and only the adapters (and modules_to_save) train"
            )
        if not isinstance(self.freeze_first_layers, int) or self.freeze_first_layers < 0:
            raise ValueError(f"freeze_first_layers must be an integer >= 0, got {self.freeze_first_layers!r}")
        for pattern in self.freeze_modules or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"freeze_modules: {pattern!r} is not a regular expression ({e})") from None

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return resolve_dtype(self.dtype)
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32


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
