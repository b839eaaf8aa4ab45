"""Benchmark: MFTTrainer vs TRL's SFTTrainer vs MFTCoder-style padding, side by side, in one command.

Every row trains the same model shape, from the same seed, on the same tokenized samples, for the same
number of optimizer steps, through the library's own training loop (`MFTTrainer.train()`,
`SFTTrainer.train()`), in a process of its own (so peak memory is the row's, and a row that fails, runs
out of memory or lacks a kernel is reported, not fatal). It reports real (non-padding) tokens per
second, the ratio to TRL's best row, MFU and peak GPU memory, plus data preparation time (ours vs
TRL's) and CoBa's cost per step. docs/benchmarks.md says what each row's step holds.

    # A real model on the CPU (any local causal LM: a checkpoint directory, a .gguf file, or a directory
    # with only config.json for random weights of that shape); its own tokenizer unless --tokenizer:
    python scripts/benchmarks/benchmark.py --model models/SmolLM2-135M-Instruct --data examples/data \
        --seq_length 1024 --rows 2 --conversations 16 --pad_micro_batch 4 --steps 3 --warmup 1

    # CPU smoke run (tiny model, a few steps; about two minutes on 2 cores):
    python scripts/benchmarks/benchmark.py --tiny --data examples/data --tokenizer examples/tokenizers/gpt2 --cpu_threads 1 \\
        --out /tmp/bench/results.json --table /tmp/bench/table.md --plot /tmp/bench/bench.png

    # GPU (see docs/benchmarks.md for how data, tokenizer and wheels travel to the GPU machine):
    bash .device/install_on_device.sh && export PYTHONPATH=/tmp/site:$PWD && \\
      python scripts/benchmarks/benchmark.py --model qwen2-0.5b --data .device/data --tokenizer .device/gpt2 \\
        --budget_s 480 --out $OUT/benchmark_0.5b.json --table $OUT/benchmark_0.5b.md

    # table and chart again from saved results (e.g. here, after the GPU run; matplotlib needed):
    python scripts/benchmarks/benchmark.py --from_results benchmark_0.5b.json --plot docs/benchmarks_gpu.png

Rows (`--only` / `--skip` select them by substring of their name; `--list` prints the plan):
- conversations group, `--conversations` (64) conversations per optimizer step:
  `mft padding sdpa plain` is the MFTCoder-style baseline (every conversation its own row, micro-batches
  of `--pad_micro_batch` padded to their longest, gradient accumulation up to 64), and
  `mft padding_free_samples` trains the same 64 conversations in one row.
- tokens group, `--rows` x `--seq_length` (4 x 4096) real-token capacity per step: `mft pack` (the
  best-fit packed rows), `mft padding_free` (the same rows joined into one), `trl rows` (TRL's
  padding-free training on the same rows: identical tokens every step) and `trl bfd` (TRL packing the
  same samples itself).
- MFT rows run with each attention backend (sdpa, torch_varlen, flash_attention_2 when installed,
  flex_attention on CUDA) and each loss implementation (`plain`, `chunked` when MFTConfig has
  `loss_implementation`); `coba` is the pack row with weighted_loss_mode coba; `prep` rows time data
  preparation.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # rows run in forked processes
# torch.cuda.is_available() through NVML, without initialising CUDA: a process that has initialised
# CUDA cannot pass it on to the rows it forks (see row_context).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mft_trainer import DataCollatorForMFT, DataConfig, MFTConfig, MFTTrainer, TaskRegistry  # noqa: E402
from mft_trainer import build_mft_dataset, install_chat_template  # noqa: E402
from mft_trainer.packing import pack_dataset  # noqa: E402
from mft_trainer.attention import TORCH_VARLEN  # noqa: E402  (importing it registers torch_varlen)
from mft_trainer.gguf_conversion import converted_gguf_checkpoint, is_gguf_path  # noqa: E402

# The chunked per-token loss (mft_trainer/chunked_loss.py) is selected by this MFTConfig field.
HAS_LOSS_IMPLEMENTATION = "loss_implementation" in MFTConfig.__dataclass_fields__

try:  # TRL is optional: without it the TRL rows report the missing package
    import trl
    from trl import SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover - depends on the environment
    trl = None

# What the rows' server process imports once (a missing one is skipped).
PRELOAD_MODULES = ["torch", "datasets", "transformers.trainer", "mft_trainer", "trl.trainer.sft_trainer"]

# Model shapes (random weights). N counts each parameter once: the tied embedding is the output layer's matmul.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # hidden 64, 2 layers; vocab_size is the tokenizer's (set in build_model)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=32768),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=32768),
}
# Dense bf16 peak of an H100/H200 SXM, the MFU denominator (--peak_tflops).
DEFAULT_PEAK_TFLOPS = 989.0

# Layouts: how the same tokenized samples become the batches of one optimizer step.
GROUP_CONVERSATIONS = "conversations"  # the same conversations in every step
GROUP_TOKENS = "tokens"  # the same real tokens in every step
LAYOUTS: dict[str, dict[str, str]] = {
    # name: (data: samples | rows, DataCollatorForMFT padding_mode, group)
    "padding": dict(data="samples", collator="padding", group=GROUP_CONVERSATIONS),
    "padding_free_samples": dict(data="samples", collator="padding_free", group=GROUP_CONVERSATIONS),
    "pack": dict(data="rows", collator="pack", group=GROUP_TOKENS),
    "padding_free": dict(data="rows", collator="padding_free", group=GROUP_TOKENS),
    # TRL: our packed rows through its padding-free collator; or its own bfd packing of the samples
    "rows": dict(data="rows", collator="trl", group=GROUP_TOKENS),
    "bfd": dict(data="samples", collator="trl", group=GROUP_TOKENS),
}
TRL_LOSS = "fused"  # TRL 1.16's own loss: a chunked ("fused") output layer that never builds full logits


# ---- what to run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measurement. kind: `train` (trainer x layout x backend x loss), `prep` (data preparation
    of `trainer`), or `probe` (the environment: device, versions, available kernels)."""

    kind: str
    trainer: str = ""  # mft | trl
    layout: str = ""  # a LAYOUTS key
    backend: str = ""  # attn_implementation
    loss: str = ""  # mft: plain | chunked; trl: fused
    loss_mode: str = "case3"  # coba for the CoBa row (mft)

    @property
    def name(self) -> str:
        if self.kind != "train":
            return f"{self.kind} {self.trainer}".strip()
        suffix = "" if self.loss_mode == "case3" else f" {self.loss_mode}"
        return f"{self.trainer} {self.layout} {self.backend} {self.loss}{suffix}"


@dataclass
class Settings:
    """The run's shared settings, the same for every row."""

    data: str
    tokenizer: str
    workdir: str
    model: str
    seq_length: int
    rows: int
    conversations: int
    pad_micro_batch: int
    steps: int
    warmup: int
    gradient_checkpointing: bool
    learning_rate: float
    data_split: str
    seed: int
    peak_tflops: float
    cpu_threads: int | None = None

    @property
    def max_steps(self) -> int:
        return self.warmup + self.steps


def plan_rows(env: dict[str, Any], backends: list[str], have_chunked: bool) -> list[Row]:
    """Every row of a full run, most important first (so that `--budget_s` cuts the least useful).

    First the rows the targets compare (our best layout, TRL's best, the MFTCoder-style baseline and
    the same conversations padding-free), then the chunked loss, TRL's own packing and CoBa, then
    flex_attention's pack row with TRL beside it (it may be the fastest kernel, but compiles), the
    sdpa rows, data preparation, and the remaining flex_attention rows.
    """
    on_cuda = env["device_type"] == "cuda"
    available = [b for b in backends if b != "flex_attention" or on_cuda]
    available = [b for b in available if b != "flash_attention_2" or env["flash_attention_2"]]
    # The packed rows' main backend: a varlen kernel on CUDA; on a CPU sdpa (torch_varlen's CPU path
    # is an exact reference, not a fast kernel).
    preferred = ["flash_attention_2", TORCH_VARLEN] if on_cuda else ["sdpa"]
    main = next((b for b in preferred + available if b in available), None)
    if main is None:
        raise ValueError(f"none of the backends {backends} can run here")
    losses = ["plain", "chunked"] if have_chunked else ["plain"]

    def packed_rows(backend: str) -> list[Row]:
        """Our two packed layouts in each loss implementation, and TRL on the same rows."""
        return [Row("train", "mft", layout, backend, loss) for layout in ("pack", "padding_free") for loss in losses] + [
            Row("train", "trl", "rows", backend, TRL_LOSS)
        ]

    rows = [
        Row("train", "mft", "pack", main, "plain"),
        Row("train", "trl", "rows", main, TRL_LOSS),
        Row("train", "mft", "padding", "sdpa", "plain"),
        Row("train", "mft", "padding_free_samples", main, "plain"),
        Row("train", "mft", "padding_free", main, "plain"),
    ]
    if have_chunked:
        rows += [Row("train", "mft", layout, main if layout != "padding" else "sdpa", "chunked")
                 for layout in ("pack", "padding_free", "padding", "padding_free_samples")]
    rows += [Row("train", "trl", "bfd", main, TRL_LOSS), Row("train", "mft", "pack", main, "plain", "coba")]
    later = []
    for backend in sorted((b for b in available if b != main), key=lambda b: b != "flex_attention"):
        if backend == "flex_attention":
            first = [Row("train", "mft", "pack", backend, "plain"), Row("train", "trl", "rows", backend, TRL_LOSS)]
            rows += first
            later += [r for r in packed_rows(backend) if r not in first]
        else:
            rows += packed_rows(backend)
    return rows + [Row("prep", "mft"), Row("prep", "trl")] + later


def select_rows(rows: list[Row], only: str | None, skip: str | None) -> list[Row]:
    """The rows whose name contains one of the comma-separated `only` parts and none of `skip`'s."""

    def parts(text: str | None) -> list[str]:
        return [p.strip() for p in (text or "").split(",") if p.strip()]

    wanted, unwanted = parts(only), parts(skip)
    return [
        r for r in rows
        if (not wanted or any(w in r.name for w in wanted)) and not any(u in r.name for u in unwanted)
    ]


def step_description(row: Row, s: Settings) -> str:
    """What one optimizer step of `row` holds, for the table."""
    micro = s.pad_micro_batch
    return {
        "padding": f"{s.conversations} conversations: {s.conversations // micro} micro-batches of {micro}, "
                   "each padded to its longest",
        "padding_free_samples": f"the same {s.conversations} conversations in one row",
        "pack": f"{s.rows} best-fit rows of <= {s.seq_length}",
        "padding_free": f"the same {s.rows} rows joined in one row",
        "rows": f"the same {s.rows} rows, TRL's padding-free collator (one row)",
        "bfd": f"{s.rows} rows of TRL's own bfd packing (max_length {s.seq_length}), one row",
    }[row.layout]


# ---- data, shared by the rows --------------------------------------------------------------------


def task_dirs(data: str) -> list[str]:
    """The task directories of `data` (one directory of jsonl files per task)."""
    paths = sorted(str(p) for p in Path(data).iterdir() if p.is_dir())
    if not paths:
        raise ValueError(f"{data} has no task directory (expected one directory of jsonl files per task)")
    return paths


def prepare_data(s: Settings) -> dict[str, Any]:
    """Tokenize the data once (samples), pack it (rows), and save both in the work directory for the
    rows to load: every row then trains on exactly these tokens."""
    tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
    config = DataConfig(data_paths=task_dirs(s.data), seq_length=s.seq_length, data_split=s.data_split,
                        skip_invalid_records=True, empty_answers="invalid", dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)
    if data.valid is None:
        raise ValueError(f"data_split {s.data_split} leaves no validation sample; the CoBa row needs some")
    rows, packing = pack_dataset(data.train, s.seq_length, config.split_seed, "train")
    valid_rows, _ = pack_dataset(data.valid, s.seq_length, config.split_seed, "valid")
    work = Path(s.workdir)
    for name, dataset in (("samples", data.train), ("rows", rows), ("valid_rows", valid_rows)):
        dataset.save_to_disk(str(work / name))
    data.tasks.save(work)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    return {
        "samples": len(data.train),
        "sample_tokens": sum(lengths),
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
        "longest_sample": max(lengths),
        "rows": packing.rows,
        "row_efficiency": round(packing.efficiency, 4),
        "valid_samples": len(data.valid),
        "skipped_invalid": data.summary.total.skipped_invalid,
        "dropped_too_long": data.summary.total.dropped_too_long,
    }


def load_data(s: Settings) -> dict[str, Any]:
    work = Path(s.workdir)
    out: dict[str, Any] = {name: load_from_disk(str(work / name)) for name in ("samples", "rows", "valid_rows")}
    out["tasks"] = TaskRegistry.load(work)
    return out


def with_seq_lengths(rows: Dataset) -> Dataset:
    """Our packed rows as TRL's packed rows: input_ids, labels and `seq_lengths` (the samples of
    each row, where position_ids restart at 0), which TRL's padding-free collator turns into
    position_ids and cu_seq_lens."""

    def lengths(row: dict[str, Any]) -> dict[str, Any]:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        return {"seq_lengths": [b - a for a, b in zip(starts, starts[1:])]}

    return rows.map(lengths).select_columns(["input_ids", "labels", "seq_lengths"])


# ---- measuring inside a row ----------------------------------------------------------------------


class StepMeter(TrainerCallback):
    """Times optimizer steps after `warmup` and counts the tokens each step trained on.

    Tokens are counted on the CPU when the training dataloader collates a micro-batch
    (`record_batch`): real tokens are the tokens of the features (samples or packed rows hold no
    padding), padded tokens the batch's `input_ids` size, trained tokens its labels != -100. The
    training loop runs micro-batches in the order they were collated (a look-ahead only queues them),
    so each `training_step` takes the oldest count. At the end of warmup the meter synchronises CUDA,
    resets the peak-memory counter and starts the clock; every later step end is synchronised too.
    """

    def __init__(self, warmup: int, device: torch.device):
        self.warmup = warmup
        self.device = device
        self.collated: deque[tuple[int, int, int]] = deque()  # (real, padded, trained) per micro-batch
        self.current = [0, 0, 0]
        self.steps: list[tuple[int, int, int]] = []  # per optimizer step, warmup included
        self.durations: list[float] = []  # seconds of each timed step
        self.peak_bytes: int | None = None
        self._last = 0.0

    def record_batch(self, features: list[dict[str, Any]], batch: dict[str, Any]) -> None:
        real = sum(len(f["input_ids"]) for f in features)
        self.collated.append((real, batch["input_ids"].numel(), int((batch["labels"] != -100).sum())))

    def start_micro_batch(self) -> None:
        for k, value in enumerate(self.collated.popleft()):
            self.current[k] += value

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(tuple(self.current))
        self.current = [0, 0, 0]
        self._synchronize()
        now = time.perf_counter()
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if state.global_step > self.warmup:
            self.durations.append(now - self._last)
            if self.device.type == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated()  # since the end of warmup
        self._last = now


class _CountingCollator:
    """The trainer's collator, telling the meter what each training micro-batch holds."""

    def __init__(self, collate: Any, meter: StepMeter):
        self.collate = collate
        self.meter = meter

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        self.meter.record_batch(features, batch)
        return batch


class _Metered:
    """Trainer mixin: counts the tokens of training micro-batches (evaluation and CoBa's validation
    batches are not counted: only the training dataloader gets the counting collator)."""

    meter: StepMeter

    def get_train_dataloader(self) -> Any:
        collate = self.data_collator
        self.data_collator = _CountingCollator(collate, self.meter)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.meter.start_micro_batch()
        return super().training_step(*args, **kwargs)


class MeteredMFTTrainer(_Metered, MFTTrainer):
    pass


if trl is not None:

    class MeteredSFTTrainer(_Metered, SFTTrainer):
        pass


# ---- one row, in its own process -----------------------------------------------------------------


def device_in_use() -> torch.device:
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
    batch, accumulation, multiple = batch_shape(row, s)
    extra: dict[str, Any] = {"loss_implementation": row.loss} if HAS_LOSS_IMPLEMENTATION else {}
    coba = row.loss_mode == "coba"
    if coba:
        # CoBa's defaults (one validation batch after every step), from the first step on.
        extra.update(coba_warmup_steps=0, per_device_eval_batch_size=batch)
    args = MFTConfig(**common_arguments(s, output_dir, device), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation, weighted_loss_mode=row.loss_mode, **extra)
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
    if row.trainer == "mft" and row.loss != "plain" and not HAS_LOSS_IMPLEMENTATION:
        raise RuntimeError("skipped: this MFTConfig has no loss_implementation field yet")
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


def trl_messages(data: str) -> tuple[list[dict[str, Any]], int]:
    """The conversations of every task as TRL `messages` (roles system/user/assistant), and how many
    records were left out because the chat template would reject them (an empty turn)."""
    roles = {"system": "system", "human": "user", "user": "user", "bot": "assistant", "assistant": "assistant",
             "gpt": "assistant"}
    conversations, skipped = [], 0
    for task in task_dirs(data):
        for path in sorted(Path(task).rglob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                turns = json.loads(line).get("chat_rounds") or []
                messages = [{"role": roles.get(str(t.get("role", "")).lower(), ""), "content": t.get("content")}
                            for t in turns]
                if not messages or any(not m["role"] or not isinstance(m["content"], str) or not m["content"].strip()
                                       for m in messages):
                    skipped += 1
                    continue
                conversations.append({"messages": messages})
    return conversations, skipped


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
        "loss_implementation": HAS_LOSS_IMPLEMENTATION,
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
        message = str(error)
        record["error"] = message if message.startswith("skipped:") else f"{type(error).__name__}: {message}"[:600]
        record["traceback"] = traceback.format_exc()[-2000:]
    record["wall_s"] = time.perf_counter() - began
    return record


def _row_process(row: Row, s: Settings, connection: Any) -> None:
    """Entry point of a row's process: run it and send the record back."""
    if s.cpu_threads:
        torch.set_num_threads(s.cpu_threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices, once per row otherwise
    datasets.disable_progress_bars()
    connection.send(run_row(row, s))
    connection.close()


def run_in_process(context: Any, row: Row, s: Settings, timeout_s: float) -> dict[str, Any]:
    """Run `row` in a process of its own (`row_context`); a crash, a kill or a timeout becomes the
    row's error."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_row_process, args=(row, s, sender))
    began = time.perf_counter()
    process.start()
    sender.close()
    record = None
    try:
        if receiver.poll(timeout_s):
            record = receiver.recv()
    except EOFError:  # the process died before sending anything
        pass
    if record is None and process.is_alive():
        process.kill()
        error = f"timed out after {timeout_s:.0f}s"
    else:
        error = None
    process.join(30)
    if process.is_alive():  # sent its record but does not exit: it must not share the device with the next row
        process.kill()
        process.join()
    if record is None:
        record = {"name": row.name, **asdict(row),
                  "error": error or f"the row's process died (exit code {process.exitcode}; -9 is a kill, e.g. "
                                    "out of host memory)",
                  "wall_s": time.perf_counter() - began}
        if row.kind == "train":
            record.update(group=LAYOUTS[row.layout]["group"], step=step_description(row, s))
    record["process_s"] = time.perf_counter() - began  # the row's process from start to exit
    return record


# ---- report ---------------------------------------------------------------------------------------


def training_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training rows, the conversations group first (plan order within a group)."""
    train = [r for r in records if r.get("kind") == "train"]
    return sorted(train, key=lambda r: r.get("group") != GROUP_CONVERSATIONS)


def is_baseline(record: dict[str, Any]) -> bool:
    """The MFTCoder-style row: padding, full logits (MFTCoder's loss), sdpa."""
    return record.get("trainer") == "mft" and record.get("layout") == "padding" and record.get("loss") == "plain"


def fastest(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The successful training row with the most real tokens/s among those whose fields equal `match`."""
    ok = [r for r in records if r.get("kind") == "train" and "error" not in r
          and all(r.get(k) == v for k, v in match.items())]
    return max(ok, key=lambda r: r["real_tokens_per_s"], default=None)


def trl_best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """TRL's fastest row: its best setting (packing bfd + padding-free is fixed; the backend is the choice)."""
    return fastest(records, trainer="trl")


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _peak(record: dict[str, Any] | None) -> str:
    return f"{record['peak_gb']:.1f} GB" if record and record.get("peak_gb") is not None else "-"


def comparisons(records: list[dict[str, Any]]) -> list[str]:
    """The issue's comparisons, one line each: our best vs TRL's best (speed, memory), vs the
    MFTCoder-style baseline, and the same conversations per step; CoBa's cost per step."""
    lines = []
    ours = fastest(records, trainer="mft", loss_mode="case3")
    trl_row, baseline = trl_best(records), next((r for r in records if is_baseline(r) and "error" not in r), None)
    same_conversations = fastest(records, trainer="mft", layout="padding_free_samples")
    if ours and trl_row:
        lines.append(f"- MFTTrainer's best row (`{ours['name']}`) vs TRL's best (`{trl_row['name']}`): "
                     f"{ours['real_tokens_per_s'] / trl_row['real_tokens_per_s']:.2f}x real tokens/s; peak memory "
                     f"{_peak(ours)} vs {_peak(trl_row)}.")
    if ours and baseline:
        lines.append(f"- MFTTrainer's best row vs MFTCoder-style padding (`{baseline['name']}`): "
                     f"{ours['real_tokens_per_s'] / baseline['real_tokens_per_s']:.2f}x real tokens/s.")
    if same_conversations and baseline:
        lines.append(f"- The same {baseline['step'].split(' ')[0]} conversations per step in one padding-free row "
                     f"(`{same_conversations['name']}`) vs padded: "
                     f"{same_conversations['real_tokens_per_s'] / baseline['real_tokens_per_s']:.2f}x real tokens/s "
                     f"({baseline['real_tokens_per_step'] / baseline['padded_tokens_per_step']:.0%} of the padded "
                     "batches' tokens are real).")
    if ours and ours.get("mfu") is not None:
        lines.append(f"- MFU of MFTTrainer's best row: {100 * ours['mfu']:.1f}% (gradient checkpointing "
                     f"{'on' if ours['gradient_checkpointing'] else 'off'}).")
    coba = fastest(records, trainer="mft", loss_mode="coba")
    base = coba and fastest(records, trainer="mft", loss_mode="case3", layout=coba["layout"], backend=coba["backend"],
                            loss=coba["loss"])
    if coba and base:
        extra = coba["seconds_per_step"] - base["seconds_per_step"]
        lines.append(f"- CoBa: {coba['seconds_per_step'] * 1000:,.0f} ms per step vs {base['seconds_per_step'] * 1000:,.0f}"
                     f" ms for the same row in case3: {extra * 1000:+,.0f} ms ({extra / base['seconds_per_step']:+.0%}) "
                     "per step (a validation batch, forward only, after every step).")
    return lines


def markdown_tables(result: dict[str, Any]) -> str:
    """The training table (with ratios to TRL's best row), the comparisons and the data preparation table."""
    records = result["rows"]
    on_cuda = result.get("environment", {}).get("device_type") == "cuda"
    best = trl_best(records)
    header = ["row", "step holds", "real tokens/step", "tokens/step (padded)", "real tokens/s", "x TRL best",
              "MFU" if on_cuda else "MFU (GPU only)", "peak GB" if on_cuda else "peak GB (GPU only)", "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in training_records(records):
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('step', '')} | {r['error'][:160]} |" + " |" * (len(header) - 3))
            continue
        ratio = r["real_tokens_per_s"] / best["real_tokens_per_s"] if best else None
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['step']} | {_fmt(r['real_tokens_per_step'])} | {_fmt(r['padded_tokens_per_step'])} | "
            f"{_fmt(r['real_tokens_per_s'])} | {_fmt(ratio, 2)} | {mfu} | {peak} | {_fmt(r['final_loss'], 3)} |"
        )
    text = ["\n".join(lines), "\n".join(comparisons(records))]
    prep = [r for r in records if r.get("kind") == "prep"]
    if prep:
        rows = ["| data preparation | seconds | conversations | packed rows | tokens | trained tokens | what is timed |",
                "|---|---|---|---|---|---|---|"]
        for r in prep:
            if "error" in r:
                rows.append(f"| {r['name']} | {r['error'][:160]} | | | | | |")
            else:
                rows.append(f"| {r['name']} | {r['seconds']:.1f} | {_fmt(r['conversations'])} | {_fmt(r['rows'])} | "
                            f"{_fmt(r['tokens'])} | {_fmt(r['trained_tokens'])} | {r['what']} |")
        text.append("\n".join(rows))
    return "\n\n".join(t for t in text if t)


def plot(result: dict[str, Any], path: str) -> None:
    """A horizontal bar chart of real tokens/s per training row, annotated with the ratio to TRL's best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in training_records(result["rows"]) if "error" not in r]
    best = trl_best(records)
    colors = {"trl": "tab:orange", "mft": "tab:blue"}
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(records) + 1.2))
    names = [r["name"] for r in records][::-1]
    values = [r["real_tokens_per_s"] for r in records][::-1]
    bar_colors = [("tab:gray" if is_baseline(r) else colors[r["trainer"]]) for r in records][::-1]
    axes.barh(names, values, color=bar_colors)
    for y, value in enumerate(values):
        label = f" {value:,.0f}" + (f" ({value / best['real_tokens_per_s']:.2f}x TRL)" if best else "")
        axes.text(value, y, label, va="center", fontsize=7)
    env = result.get("environment", {})
    axes.set_xlabel("real (non-padding) tokens per second")
    axes.set_title(f"{Path(result['settings']['model']).name} on {env.get('device', '?')}: gray = MFTCoder-style padding, "
                   "blue = MFTTrainer, orange = TRL", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.set_xlim(0, max(values, default=1) * 1.35)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="directory of task directories (e.g. ../shared/data)")
    parser.add_argument("--tokenizer", help="tokenizer directory (e.g. ../shared/tokenizers/gpt2)")
    parser.add_argument("--model",
                        help=f"a random-weight shape ({', '.join(sorted(MODEL_SHAPES))}), or any local causal LM: a "
                        "checkpoint directory, a .gguf file (converted once), or a directory with only config.json "
                        "(random weights of that shape); default qwen2-0.5b, or tiny with --tiny")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke sizes: tiny model, seq_length 512, 2 rows, 8 conversations in micro-batches "
                             "of 4, 1 warmup + 2 timed steps (explicit flags still win)")
    parser.add_argument("--seq_length", type=int, help="packed row length (default 4096)")
    parser.add_argument("--rows", type=int, help="packed rows per step: the tokens group's capacity (default 4)")
    parser.add_argument("--conversations", type=int, help="conversations per step, conversations group (default 64)")
    parser.add_argument("--pad_micro_batch", type=int, help="padding layout: conversations per micro-batch (default 8)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per row (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 3)")
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="gradient checkpointing in every row (default off)")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--data_split", default="98,2", help="train/validation split; the validation part feeds CoBa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="accelerator peak, the MFU denominator (989: H100/H200 dense bf16)")
    parser.add_argument("--cpu_threads", type=int,
                        help="torch threads of each row on a CPU (default torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--backends", default=f"sdpa,{TORCH_VARLEN},flash_attention_2,flex_attention",
                        help="attention backends to try (flash_attention_2 if installed, flex_attention on CUDA)")
    parser.add_argument("--only", help="run only the rows whose name contains one of these comma-separated parts")
    parser.add_argument("--skip", help="leave out the rows whose name contains one of these comma-separated parts")
    parser.add_argument("--budget_s", type=float, default=0,
                        help="stop starting rows when this many seconds have passed, or when the next row (estimated "
                             "from those run) would pass it; a row still running at the budget is stopped and "
                             "reported as timed out; 0: no budget")
    parser.add_argument("--row_timeout_s", type=float, default=600, help="kill a row that runs longer")
    parser.add_argument("--start_method", default="forkserver", choices=["forkserver", "spawn"],
                        help="how row processes start: forks of a preloaded server (fast), or fresh interpreters")
    parser.add_argument("--workdir", help="where the tokenized data is kept for the rows (default: a temporary dir)")
    parser.add_argument("--out", help="write the results (JSON) here, after every row")
    parser.add_argument("--table", help="write the markdown tables here")
    parser.add_argument("--plot", help="draw the bar chart (PNG) here (needs matplotlib)")
    parser.add_argument("--list", action="store_true", help="print the rows that would run, and stop")
    parser.add_argument("--from_results", help="print the tables (and --plot) of a saved results JSON; run nothing")
    args = parser.parse_args(argv)
    tiny = dict(seq_length=512, rows=2, conversations=8, pad_micro_batch=4, steps=2, warmup=1)
    full = dict(seq_length=4096, rows=4, conversations=64, pad_micro_batch=8, steps=10, warmup=3)
    for name, value in (tiny if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model is None:
        args.model = "tiny" if args.tiny else "qwen2-0.5b"
    if args.model not in MODEL_SHAPES and not args.from_results:
        if not Path(args.model).exists():
            parser.error(f"--model {args.model!r} is neither a shape ({', '.join(sorted(MODEL_SHAPES))}) nor a local path")
        if is_gguf_path(args.model):
            args.model = str(converted_gguf_checkpoint(args.model))
        if args.tokenizer is None and has_weights(args.model):
            args.tokenizer = args.model  # the model's own tokenizer
    if not args.from_results and not (args.data and args.tokenizer):
        parser.error("--data and --tokenizer are required (unless --from_results, or --model is a checkpoint "
                     "with its tokenizer)")
    return args


def settings_from(args: argparse.Namespace, workdir: str) -> Settings:
    return Settings(
        data=args.data, tokenizer=args.tokenizer, workdir=workdir, model=args.model, seq_length=args.seq_length,
        rows=args.rows, conversations=args.conversations, pad_micro_batch=args.pad_micro_batch, steps=args.steps,
        warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing, learning_rate=args.learning_rate,
        data_split=args.data_split, seed=args.seed, peak_tflops=args.peak_tflops, cpu_threads=args.cpu_threads,
    )


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    tables = markdown_tables(result)
    print(tables)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(tables + "\n")
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("no chart: matplotlib is not installed (pip install matplotlib); rerun with --from_results")


def row_context(method: str) -> Any:
    """The multiprocessing context the rows run in.

    `forkserver` (default): rows start as forks of a server process that has imported the heavy
    modules once, so a row starts in a second rather than after a fresh import, with no CUDA state
    (this process never touches CUDA; PYTORCH_NVML_BASED_CUDA_CHECK keeps `is_available()` from
    initialising it in the server). The server starts now and imports while the data is built. (Named
    modules, not "__main__": before Python 3.13 the forkserver ignores a "__main__" preload; each row
    re-runs this file's top level, which is cheap once its imports are loaded.) Where an import
    initialises CUDA anyway (bitsandbytes does, when transformers imports it on a GPU machine), forked
    rows cannot use CUDA: `run` sees the probe row fail and switches to `spawn`.
    `spawn`: a fresh interpreter per row (a full import each), the safe fallback.
    """
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD_MODULES)
        multiprocessing.forkserver.ensure_running()
    return context


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the data, probe the machine, then run the planned rows one process each."""
    began = time.perf_counter()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mft_bench_data_")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    s = settings_from(args, workdir)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "settings": asdict(s), "rows": []}
    context = row_context(args.start_method)
    result["data"] = prepare_data(s)
    print(f"data: {json.dumps(result['data'])}", flush=True)
    env = run_in_process(context, Row("probe"), s, args.row_timeout_s)
    if "error" in env and args.start_method == "forkserver":
        # A server import that initialised CUDA would leave forked rows without it.
        print(f"note: the probe failed in a forked process ({env['error']}); every row now starts a fresh interpreter")
        context = row_context("spawn")
        env = run_in_process(context, Row("probe"), s, args.row_timeout_s)
    if "error" in env:
        raise RuntimeError(f"the probe row failed: {env['error']}\n{env.get('traceback', '')}")
    result["start_method"] = context.get_start_method()
    result["environment"] = {k: v for k, v in env.items() if k not in ("name", "kind", "trainer", "layout", "backend",
                                                                        "loss", "loss_mode", "wall_s", "process_s")}
    print(f"environment: {json.dumps(result['environment'])}", flush=True)
    rows = select_rows(plan_rows(env, args.backends.split(","), env["loss_implementation"]), args.only, args.skip)
    if args.list:
        print("\n".join(r.name for r in rows))
        return result
    if not env["loss_implementation"]:
        print("note: MFTConfig has no loss_implementation field yet: the chunked-loss rows are not planned")
    for row in rows:
        elapsed = time.perf_counter() - began
        done = [r["process_s"] for r in result["rows"] if r.get("kind") == row.kind and "process_s" in r]
        estimate = sum(done) / len(done) if done else 0.0
        if args.budget_s and elapsed + estimate > args.budget_s:
            record = {"name": row.name, **asdict(row),
                      "error": f"skipped: --budget_s {args.budget_s:.0f} (elapsed {elapsed:.0f}s, a row takes ~{estimate:.0f}s)",
                      "wall_s": 0.0}
        else:
            timeout = args.row_timeout_s
            if args.budget_s:
                timeout = max(min(timeout, args.budget_s - elapsed), 1.0)
            record = run_in_process(context, row, s, timeout)
        if row.kind == "train":
            record.setdefault("group", LAYOUTS[row.layout]["group"])
            record.setdefault("step", step_description(row, s))
        summary = {k: v for k, v in record.items() if k not in ("traceback", "real_tokens_by_step")}
        print(json.dumps(summary, default=str), flush=True)
        result["rows"].append(record)
        write_outputs(result, args)
    result["total_s"] = time.perf_counter() - began
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
    else:
        result = run(args)
        if args.list:
            return 0
        write_outputs(result, args)
    report(result, args)
    failed = [r["name"] for r in result["rows"] if "error" in r and not r["error"].startswith("skipped:")]
    if failed:
        print(f"failed rows: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
