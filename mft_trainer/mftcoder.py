"""Migration from MFTCoder: translate its JSON train config (mftcoder_accelerate) into recipe keys.

>>> values, notes = translate_mftcoder_config({"data_paths": "[data/a,data/b]", "lora_rank": 64,
...                                            "log_interval": 10, "min_lr": 1e-6, "learning_rate": 1e-4})
>>> values["data_paths"], values["logging_steps"], values["lr_scheduler_type"]
(['data/a', 'data/b'], 10, 'cosine_with_min_lr')

Every key is either translated (and the mapping is listed in `notes`) or reported as having no
meaning here; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

# Keys only MFTCoder configs have; one of them marks a JSON file as an MFTCoder config.
MFTCODER_MARKERS = frozenset(
    {"pretrained_model_path", "log_interval", "checkpointing_steps", "evaluation_steps", "tb_dir", "model_type",
     "early_stopping_stall_num", "saving_limit", "max_train_steps", "num_warmup_steps", "min_lr"}
)

# Same meaning, other name.
RENAMED = {
    "pretrained_model_path": "model_name_or_path",
    "log_interval": "logging_steps",
    "max_train_steps": "max_steps",
    "saving_limit": "save_total_limit",
    "init_timeout_seconds": "ddp_timeout",
}
# Same name, same meaning.
SAME = (
    "output_dir", "data_split", "padding_mode", "weighted_loss_mode", "peft_type", "quantization", "lora_rank",
    "lora_alpha", "lora_dropout", "target_modules", "per_device_train_batch_size", "per_device_eval_batch_size",
    "learning_rate", "weight_decay", "gradient_accumulation_steps", "lr_scheduler_type", "num_train_epochs",
    "seed", "seq_length", "resume_from_checkpoint", "attn_implementation", "role_markers", "trust_remote_code",
    "coba_warmup_steps", "coba_history_length", "coba_tau", "coba_update_interval", "coba_sample_valid_num",
)
# Keys with no meaning here, and why.
NO_MEANING = {
    "model_type": "the model class comes from the checkpoint's config (AutoModelForCausalLM)",
    "tb_dir": "TensorBoard logs go where transformers puts them (report_to: [tensorboard])",
    "tokenizer_type": "the tokenizer is loaded with AutoTokenizer",
    "load_raw_dataset": "data is always read from jsonl (raw)",
    "data_weights": "not translated: set task_sampling: {weights: {task_name: weight}} to sample tasks by weight, "
    "or task_weights to weight their losses",
    "low_cpu_mem_usage": "transformers always loads with low CPU memory use",
    "tokenize_mode": "sft is the only mode; use `text` records for pre-training-style data",
    "shuffle_before_split": "the train/valid split is always a seeded shuffle per task",
    "use_dynamic_padding": "padding is always dynamic (to the longest of the batch)",
    "distributed_type": "the launcher (torchrun, accelerate, deepspeed) decides",
    "use_xformers": "legacy in MFTCoder",
    "weight_by_num_documents": "legacy in MFTCoder",
    "make_vocab_size_divisible_by": "legacy in MFTCoder",
    "model_parallel_size": "legacy in MFTCoder",
    "use_slow_tokenizer": "legacy in MFTCoder",
    "world_size": "the launcher sets the world size",
    "early_stopping": "early stopping is on when early_stopping_stall_num is set",
}


def is_mftcoder_config(values: Mapping[str, Any]) -> bool:
    return bool(MFTCODER_MARKERS & set(values))


def _as_list(value: Any) -> list[str]:
    """MFTCoder writes lists as strings, "[a,b]"; accept those, JSON lists and comma lists."""
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        except json.JSONDecodeError:
            text = text[1:-1]
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]


def _task_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.stem if p.suffix == ".jsonl" else p.name


def translate_mftcoder_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Translate an MFTCoder train config into recipe values; return (values, notes).

    Raises:
        ValueError: a setting that cannot be honoured (e.g. load_raw_dataset false).
    """
    values: dict[str, Any] = {}
    notes: list[str] = ["MFTCoder config translated:"]

    def put(old: str, new: str, value: Any) -> None:
        values[new] = value
        notes.append(f"  {old} -> {new}: {value!r}")

    handlers: dict[str, Callable[[Any], None]] = {}

    def data_paths(value: Any) -> None:
        put("data_paths", "data_paths", _as_list(value))

    def task_weights(value: Any) -> None:
        if value in (None, "", "None"):
            return
        weights = [float(w) for w in _as_list(value)]
        names = [_task_name(p) for p in _as_list(config.get("data_paths", []))]
        if len(names) != len(weights):
            raise ValueError(f"task_weights has {len(weights)} values but data_paths has {len(names)} tasks")
        put("task_weights", "task_weights", dict(zip(names, weights)))

    def min_lr(value: Any) -> None:
        put("min_lr", "lr_scheduler_type", "cosine_with_min_lr")
        put("min_lr", "lr_scheduler_kwargs", {"min_lr": float(value)})

    def warmup(value: Any) -> None:
        # transformers reads warmup_steps < 1 as a fraction of the training steps, like MFTCoder.
        put("num_warmup_steps", "warmup_steps", float(value) if float(value) < 1 else int(value))

    def checkpointing_steps(value: Any) -> None:
        put("checkpointing_steps", "save_strategy", "steps")
        put("checkpointing_steps", "save_steps", int(value))

    def evaluation_steps(value: Any) -> None:
        put("evaluation_steps", "eval_strategy", "steps")
        put("evaluation_steps", "eval_steps", int(value))

    def epoch_checkpointing(value: Any) -> None:
        if value:
            put("epoch_checkpointing", "save_strategy", "epoch")

    def auto_resume(value: Any) -> None:
        if value and not config.get("resume_from_checkpoint"):
            put("auto_resume", "resume_from_checkpoint", "auto")

    def use_random_sampler(value: Any) -> None:
        put("use_random_sampler", "train_sampling_strategy", "random" if value else "sequential")

    def stall_num(value: Any) -> None:
        if config.get("early_stopping", True) and value:
            put("early_stopping_stall_num", "early_stopping_patience", int(value))

    def load_raw_dataset(value: Any) -> None:
        if value is False:
            raise ValueError("load_raw_dataset false (MFTCoder's offline-tokenized binaries) is not supported: "
                             "point data_paths at the jsonl task directories")
        notes.append(f"  load_raw_dataset: no meaning here ({NO_MEANING['load_raw_dataset']})")

    def peft_type(value: Any) -> None:
        put("peft_type", "peft_type", "none" if value in (None, "None", "null", "") else value)

    def quantization(value: Any) -> None:
        if value not in (None, "None", "null", "") and config.get("peft_type") == "qlora":
            put("quantization", "quantization", value)
        elif value not in (None, "None", "null", ""):
            notes.append(f"  quantization: {value!r} ignored, it applies to peft_type qlora only")

    handlers.update(
        data_paths=data_paths, task_weights=task_weights, min_lr=min_lr, num_warmup_steps=warmup,
        checkpointing_steps=checkpointing_steps, evaluation_steps=evaluation_steps,
        epoch_checkpointing=epoch_checkpointing, auto_resume=auto_resume, use_random_sampler=use_random_sampler,
        early_stopping_stall_num=stall_num, load_raw_dataset=load_raw_dataset, peft_type=peft_type,
        quantization=quantization,
    )

    unknown = []
    for key, value in config.items():
        if key in handlers:
            handlers[key](value)
        elif key in RENAMED:
            put(key, RENAMED[key], value)
        elif key in SAME:
            if key == "target_modules" and isinstance(value, str):
                value = _as_list(value)
            put(key, key, value)
        elif key in NO_MEANING:
            if key != "load_raw_dataset":
                notes.append(f"  {key}: no meaning here ({NO_MEANING[key]})")
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"MFTCoder config has key(s) this translator does not know: {unknown}")
    if "min_lr" in config:
        # min_lr is a floor of a cosine schedule; it wins over lr_scheduler_type, whatever the key order.
        if config.get("lr_scheduler_type", "cosine") not in ("cosine", "cosine_with_min_lr"):
            notes.append(f"  note: lr_scheduler_type {config['lr_scheduler_type']!r} replaced by cosine_with_min_lr "
                         "(min_lr needs a cosine schedule)")
        values["lr_scheduler_type"] = "cosine_with_min_lr"
    return values, notes
