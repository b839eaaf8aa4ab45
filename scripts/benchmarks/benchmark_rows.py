"""What one row does, inside its own process: a training row (model, trainer, timed steps), a data
preparation row (ours vs TRL's, timed), or the probe of the machine (device, versions, kernels).

`run_row` runs any of them and turns a failure into the row's `error`, so that one failing row
cannot hide the others.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.trainer_callback import PrinterCallback

from benchmark_metering import MeteredMFTTrainer, MeteredSFTTrainer, StepMeter
from benchmark_plan import LAYOUTS, MODEL_SHAPES, Row, Settings, step_description
from benchmark_shared_data import load_data, task_dirs, trl_messages, with_seq_lengths
from mft_trainer import DataCollatorForMFT, DataConfig, MFTConfig, MFTTrainer
from mft_trainer import build_mft_dataset, install_chat_template

try:  # TRL is optional: without it the TRL rows report the missing package
    import trl
    from trl import SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover - depends on the environment
    trl = None


def device_in_use() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_weights(path: str) -> bool:
    """True for a checkpoint directory with weights (not only a config.json)."""
    return any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))


def build_model(s: Settings, vocab_size: int, backend: str, device: torch.device) -> Any:
    """The row's model; bfloat16 on CUDA, float32 on a CPU. A shape name (MODEL_SHAPES) or a directory
    with only config.json gives random weights from `s.seed`; a checkpoint directory its weights."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(s.seed)
    if s.model not in MODEL_SHAPES:
        if has_weights(s.model):
            model = AutoModelForCausalLM.from_pretrained(s.model, dtype=dtype, device_map=device)
        else:
            with device:
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(s.model), dtype=dtype)
        model.set_attn_implementation(backend)
        return model
    shape = dict(MODEL_SHAPES[s.model])
    shape.setdefault("vocab_size", vocab_size)
    with device:  # initialised on the device: a 1.5B model initialised on the CPU takes minutes
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model = model.to(dtype)
    model.set_attn_implementation(backend)
    return model


def common_arguments(s: Settings, output_dir: str, device: torch.device) -> dict[str, Any]:
    """TrainingArguments fields every trainer gets alike (TRL's SFTConfig defaults differ: gradient
    checkpointing on, bf16 on, another learning rate; all set explicitly here)."""
    return dict(
        output_dir=output_dir, max_steps=s.max_steps, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        seed=s.seed, data_seed=s.seed, dataloader_num_workers=0, bf16=device.type == "cuda",
        use_cpu=device.type != "cuda", gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def batch_shape(row: Row, s: Settings) -> tuple[int, int, int | None]:
    """(per-device batch size, gradient accumulation steps, pad_to_multiple_of) of a training row.
    flex_attention compiles per shape, so its rows are padded to one fixed length."""
    flex = row.backend == "flex_attention"
    if row.layout == "padding":
        if s.conversations % s.pad_micro_batch:
            raise ValueError(f"--conversations {s.conversations} is not a multiple of --pad_micro_batch {s.pad_micro_batch}")
        return s.pad_micro_batch, s.conversations // s.pad_micro_batch, None
    if row.layout == "padding_free_samples":
        return s.conversations, 1, None
    if row.layout == "pack":
        return s.rows, 1, s.seq_length if flex else None
    return s.rows, 1, s.rows * s.seq_length if flex else None  # one row of up to rows x seq_length


def make_mft_trainer(row: Row, s: Settings, model: Any, tokenizer: Any, data: dict, meter: StepMeter,
                     device: torch.device, output_dir: str) -> MFTTrainer:
    """MFTTrainer on the row's layout (its dataset and collator), loss implementation and loss mode."""
    batch, accumulation, multiple = batch_shape(row, s)
    coba = row.loss_mode == "coba"
    # CoBa's defaults (one validation batch after every step), from the first step on.
    coba_fields: dict[str, Any] = dict(coba_warmup_steps=0, per_device_eval_batch_size=batch) if coba else {}
    args = MFTConfig(**common_arguments(s, output_dir, device), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation, weighted_loss_mode=row.loss_mode,
                     loss_implementation=row.loss, **coba_fields)
    layout = LAYOUTS[row.layout]
    collator = DataCollatorForMFT(tokenizer.eos_token_id, pad_to_multiple_of=multiple, padding_mode=layout["collator"])
    trainer = MeteredMFTTrainer(
        model=model, args=args, data_collator=collator, train_dataset=data[layout["data"]],
        eval_dataset=data["valid_rows"] if coba else None, processing_class=tokenizer, tasks=data["tasks"],
    )
    trainer.meter = meter
    return trainer


def make_trl_trainer(row: Row, s: Settings, model: Any, tokenizer: Any, data: dict, meter: StepMeter,
                     device: torch.device, output_dir: str) -> Any:
    """TRL's best setting: packing with best-fit decreasing (which implies padding-free batches: the
    rows of a batch joined in one, boundaries by position_ids and cu_seq_lens), its default loss."""
    if trl is None:
        raise RuntimeError("trl is not installed (pip install trl)")
    batch, _, multiple = batch_shape(row, s)
    own_packing = row.layout == "bfd"
    args = SFTConfig(
        **common_arguments(s, output_dir, device), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        packing=True, packing_strategy="bfd", padding_free=True, max_length=s.seq_length, pad_to_multiple_of=multiple,
        # our rows are TRL's packed rows already; for `bfd`, TRL packs the tokenized samples itself
        dataset_kwargs=None if own_packing else {"skip_prepare_dataset": True},
    )
    train = data["samples"].select_columns(["input_ids", "labels"]) if own_packing else with_seq_lengths(data["rows"])
    trainer = MeteredSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.meter = meter
    return trainer


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once each (a tied embedding once: it is the output layer's matmul)."""
    return sum(p.numel() for p in model.parameters())


def run_training_row(row: Row, s: Settings) -> dict[str, Any]:
    """Train the row's model for warmup + timed steps and return what the meter measured."""
    device = device_in_use()
    tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
    data = load_data(s)
    model = build_model(s, len(tokenizer), row.backend, device)
    parameters = count_parameters(model)
    meter = StepMeter(s.warmup, device)
    output_dir = tempfile.mkdtemp(prefix="mft_bench_")
    make = make_mft_trainer if row.trainer == "mft" else make_trl_trainer
    trainer = make(row, s, model, tokenizer, data, meter, device, output_dir)
    trainer.remove_callback(PrinterCallback)  # one printed dict per step otherwise (disable_tqdm)
    trainer.add_callback(meter)  # last, so that CoBa's validation after a step falls inside the timing
    began = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - began
    shutil.rmtree(output_dir, ignore_errors=True)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    timed = meter.steps[s.warmup:]
    seconds = sum(meter.durations)
    real = sum(t[0] for t in timed)
    out: dict[str, Any] = {
        "steps": len(meter.durations),
        "warmup": s.warmup,
        "real_tokens_per_step": real / max(len(timed), 1),
        "padded_tokens_per_step": sum(t[1] for t in timed) / max(len(timed), 1),
        "trained_tokens_per_step": sum(t[2] for t in timed) / max(len(timed), 1),
        "real_tokens_by_step": [t[0] for t in meter.steps],  # warmup included
        "seconds_per_step": seconds / max(len(meter.durations), 1),
        "real_tokens_per_s": real / seconds if seconds > 0 else 0.0,
        "final_loss": losses[-1] if losses else float("nan"),
        "parameters": parameters,
        "peak_gb": meter.peak_bytes / 2**30 if meter.peak_bytes is not None else None,
        "train_s": train_s,
        "dataset_rows": len(trainer.train_dataset),
        "gradient_checkpointing": s.gradient_checkpointing,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "optimizer": str(trainer.args.optim),
    }
    if device.type == "cuda" and s.peak_tflops > 0:
        out["mfu"] = 6 * parameters * out["real_tokens_per_s"] / (s.peak_tflops * 1e12)
    return out


def run_prep_row(row: Row, s: Settings) -> dict[str, Any]:
    """Seconds to turn the data files into packed training rows (tokenize, mask, pack), no cache.
    Each pipeline first runs once on a few conversations, so one-time set-up is not counted."""
    tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
    datasets.disable_caching()
    if row.trainer == "mft":
        def build(paths: list[str]) -> Any:
            config = DataConfig(data_paths=paths, seq_length=s.seq_length, data_split="100,0", padding_mode="pack",
                                # empty answers left out, as trl_messages leaves them out
                                skip_invalid_records=True, empty_answers="invalid", dataset_cache_dir="none")
            return build_mft_dataset(config, tokenizer)

        smallest = min(task_dirs(s.data), key=lambda p: sum(f.stat().st_size for f in Path(p).rglob("*.jsonl")))
        build([smallest])
        began = time.perf_counter()
        data = build(task_dirs(s.data))
        seconds = time.perf_counter() - began
        rows, total = data.train, data.summary.total
        return {"seconds": seconds, "conversations": total.samples, "rows": len(rows),
                "tokens": total.tokens, "trained_tokens": total.trained_tokens,
                "skipped": total.skipped_invalid + total.dropped_too_long,
                "what": "build_mft_dataset(padding_mode=pack): read + validate, render + tokenize + mask, pack"}
    if trl is None:
        raise RuntimeError("trl is not installed (pip install trl)")
    # With {% generation %} around each trained span, which assistant_only_loss reads.
    install_chat_template(tokenizer, generation_markers=True)
    model = build_model(replace(s, model="tiny"), len(tokenizer), "sdpa", torch.device("cpu"))
    output_dir = tempfile.mkdtemp(prefix="mft_bench_")

    def build(conversations: list[dict[str, Any]]) -> Any:
        args = SFTConfig(output_dir=output_dir, report_to=[], use_cpu=True, bf16=False, packing=True,
                         packing_strategy="bfd", max_length=s.seq_length, assistant_only_loss=True)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(conversations),
                          processing_class=tokenizer).train_dataset

    build(trl_messages(s.data)[0][:8])
    began = time.perf_counter()
    conversations, skipped = trl_messages(s.data)
    rows = build(conversations)
    seconds = time.perf_counter() - began
    shutil.rmtree(output_dir, ignore_errors=True)
    lengths = [len(ids) for ids in rows["input_ids"]]
    trained = sum(sum(1 for label in labels if label != -100) for labels in rows["labels"])
    return {"seconds": seconds, "conversations": len(conversations), "rows": len(rows), "tokens": sum(lengths),
            "trained_tokens": trained, "skipped": skipped,
            "what": "read jsonl -> messages; SFTTrainer(packing bfd, assistant_only_loss): "
                    "chat template + tokenize, labels, pack"}


def probe_environment(s: Settings) -> dict[str, Any]:
    """Device, versions and kernels of the machine the rows run on."""
    from transformers.utils import is_flash_attn_2_available

    device = device_in_use()
    if device.type == "cuda":
        torch.zeros(1, device=device)  # initialise CUDA here: a process that cannot fails the probe
    env: dict[str, Any] = {
        "device_type": device.type,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "trl": trl.__version__ if trl is not None else None,
        "flash_attention_2": bool(is_flash_attn_2_available()),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        env["cpu"] = names[0] if names else None
    return env


def run_row(row: Row, s: Settings) -> dict[str, Any]:
    """Run one row; the result always has `name`, and `error` when it failed or was skipped."""
    record: dict[str, Any] = {"name": row.name, **asdict(row)}
    if row.kind == "train":
        record.update(group=LAYOUTS[row.layout]["group"], step=step_description(row, s))
    began = time.perf_counter()
    try:
        run = {"train": run_training_row, "prep": run_prep_row, "probe": lambda r, st: probe_environment(st)}[row.kind]
        record.update(run(row, s))
    except Exception as error:  # reported, not fatal: one failing row must not hide the others
        record["error"] = f"{type(error).__name__}: {error}"[:600]
        record["traceback"] = traceback.format_exc()[-2000:]
    record["wall_s"] = time.perf_counter() - began
    return record
