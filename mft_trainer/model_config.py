"""`ModelConfig`: which model to fine-tune and how (full fine-tuning, LoRA or QLoRA), and the names
of the weight dtypes a setting may use.

>>> config = ModelConfig(model_name_or_path="Qwen/Qwen2.5-Coder-1.5B", peft_type="lora", lora_rank=64)
>>> config.peft_type, config.lora_alpha
('lora', 32)

`mft_trainer.modeling` loads what it names (`load_tokenizer`, `load_model`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .json_settings import parse_json_text
from .modes import PeftType


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
        self.peft_type = PeftType.parse(self.peft_type or "none").value
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
