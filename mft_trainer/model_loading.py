"""Loading a saved model for generation: the model, its tokenizer, and the prompt format it was trained in.

- `load_model_and_tokenizer`: a full model directory, or a LoRA adapter directory (its base model is
  loaded first, then the adapter with peft), in eval mode on the device.
- `saved_prompt_format`: the prompt format a saved run was trained in (from its `run_config.yaml`, or
  its tokenizer's chat template), so that generation prompts the model as in training (invariant 5).

>>> model, tokenizer = load_model_and_tokenizer("output/run1", dtype="bfloat16")  # doctest: +SKIP
>>> saved_prompt_format("output/run1", tokenizer).name                            # doctest: +SKIP
'mftcoder'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .gguf_conversion import converted_gguf_checkpoint, is_gguf_path
from .model_config import resolve_dtype
from .paths import check_local_path
from .prompt_format import ChatTemplateMode, get_prompt_format
from .rendering import RoleMarkers
from .run_artifacts import has_generation_config, read_run_config
from .segments import PromptFormat

ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a peft adapter (`adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(adapter_path: str | os.PathLike) -> str:
    """The base model recorded in an adapter's `adapter_config.json` (`base_model_name_or_path`)."""
    config = json.loads((Path(adapter_path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{Path(adapter_path) / ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
            "pass the base model's path explicitly"
        )
    return base


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in _TOKENIZER_FILES)


def load_model_and_tokenizer(
    model_path: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a model for generation: a full model directory, or a LoRA adapter directory.

    An adapter directory (one with `adapter_config.json`) is loaded onto its base model with peft;
    the base is `base_model`, or the `base_model_name_or_path` the adapter recorded. The tokenizer is
    the adapter directory's when it has one (training saves it there, with the chat template), else
    the base model's. If training added tokens, the base's embeddings are resized to the tokenizer
    before the adapter is loaded. QLoRA adapters load onto the unquantized base in `dtype`.

    Args:
        model_path: a model directory (or hub name) or an adapter directory.
        base_model: the base of an adapter, overriding the one it recorded.
        dtype: "auto" (the checkpoint's dtype), "float32", "bfloat16" or "float16".
        device: where to run (default: "cuda" when available, else "cpu").
        trust_remote_code: allow model code from the checkpoint (off unless you trust it).

    Returns:
        (model, tokenizer), the model in eval mode on `device`.

    Raises:
        FileNotFoundError: a local model path (or the adapter's base) that does not exist, before
            anything is loaded or looked up on the hub.

    >>> model, tok = load_model_and_tokenizer("output/run1", dtype="bfloat16")      # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_local_path(model_path, "model")
    if is_gguf_path(model_path):
        model_path = converted_gguf_checkpoint(model_path)
    adapter = is_adapter_dir(model_path)
    if base_model is not None and not adapter:
        raise ValueError(f"base_model was given but {model_path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    weights_path = (base_model or adapter_base_model(model_path)) if adapter else model_path
    if adapter:
        what = "base model" if base_model is not None else f"base model (recorded in {Path(model_path) / ADAPTER_CONFIG})"
        check_local_path(weights_path, what)
    tokenizer_path = weights_path if adapter and not _has_tokenizer(model_path) else model_path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(weights_path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if adapter:
        from peft import PeftModel

        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            # Training added tokens and saved the resized embeddings with the adapter.
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, str(model_path))
        if has_generation_config(model_path):
            # Training saves the generation config beside the adapter: it stops at the trained end of turn.
            from transformers import GenerationConfig

            model.base_model.model.generation_config = GenerationConfig.from_pretrained(str(model_path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    return model, tokenizer


def saved_prompt_format(
    model_dir: str | os.PathLike,
    tokenizer: Any,
    chat_template: str | None = None,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> PromptFormat:
    """The prompt format a saved run was trained in, for its saved tokenizer.

    The run's `run_config.yaml` (saved with every model by MFTTrainer.save_model) gives `chat_template`, `role_markers`
    and `eos_token`; arguments that are not None override it. A template mode (`model` or a
    .jinja file) means the saved tokenizer's own template, which training kept or installed. Without
    a run config, a tokenizer whose template is MFTCoder's (or that has none) means `mftcoder`,
    any other template `model` (a base model is prompted in its own template); but an adapter
    directory without a tokenizer of its own means the default, `mftcoder`, since its base model's
    template says nothing of how the adapter was trained.

    >>> model, tok = load_model_and_tokenizer("output/run1")                        # doctest: +SKIP
    >>> saved_prompt_format("output/run1", tok).name                                # doctest: +SKIP
    "the tokenizer's chat template"
    """
    from .chat_template import is_mft_chat_template

    settings = read_run_config(model_dir).get("data") or {}
    mode = chat_template or settings.get("chat_template")
    if mode is None and is_adapter_dir(model_dir) and not _has_tokenizer(model_dir):
        mode = ChatTemplateMode.MFTCODER.value
    if mode is None:
        template = getattr(tokenizer, "chat_template", None)
        mode = ChatTemplateMode.MFTCODER.value if not template or is_mft_chat_template(template) else "model"
    if mode != ChatTemplateMode.MFTCODER.value:
        mode = ChatTemplateMode.MODEL.value  # the saved tokenizer carries the template training used
        return get_prompt_format(tokenizer, mode, eos_token=eos_token or settings.get("eos_token"))
    markers = role_markers if role_markers is not None else settings.get("role_markers")
    return get_prompt_format(tokenizer, mode, markers, eos_token or settings.get("eos_token"))
