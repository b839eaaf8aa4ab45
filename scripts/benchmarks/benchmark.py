"""Benchmark: MFTTrainer vs TRL's SFTTrainer vs MFTCoder-style padding, side by side, in one command.

Every row trains the same model shape, from the same seed, on the same tokenized samples, for the same
number of optimizer steps, through the library's own training loop (`MFTTrainer.train()`,
`SFTTrainer.train()`), in a process of its own (so peak memory is the row's, and a row that fails, runs
out of memory or lacks a kernel is reported, not fatal). It reports real (non-padding) tokens per
second, the ratio to TRL's best row, MFU and peak GPU memory, plus data preparation time (ours vs
TRL's) and CoBa's cost per step. docs/benchmarks.md says what each row's step holds.

    # A real model on the CPU (any local causal LM: a checkpoint directory, a .gguf file, or a directory
    # with only config.json for random weights of that shape); its own tokenizer unless --tokenizer:
    python scripts/benchmarks/benchmark.py --model models/SmolLM2-135M-Instruct --data examples/data \\
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
  flex_attention on CUDA) and each loss implementation (`plain`, `chunked`: MFTConfig's
  `loss_implementation`); `coba` is the pack row with weighted_loss_mode coba; `prep` rows time data
  preparation.
"""

# This file is the command line and the run: prepare the data, probe the machine, run the rows. The
# benchmark's modules, beside it, one concept each (the docstring above is --help, so it is kept here):
#   benchmark_plan.py         what a row is, the settings the rows share, which rows a run holds
#   benchmark_shared_data.py  the data every row trains on, prepared once
#   benchmark_metering.py     the step clock and token counts inside a training row
#   benchmark_rows.py         what one row does: train, time data preparation, or probe the machine
#   benchmark_isolation.py    each row in a process of its own
#   benchmark_report.py       the tables, the chart and the results JSON

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # rows run in forked processes
# torch.cuda.is_available() through NVML, without initialising CUDA: a process that has initialised
# CUDA cannot pass it on to the rows it forks (see benchmark_isolation.row_context).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import datasets  # noqa: E402
import transformers  # noqa: E402

# The repository root, for mft_trainer when it is not installed; this file's folder (sys.path[0])
# holds the benchmark's modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmark_isolation import row_context, run_in_process  # noqa: E402
from benchmark_plan import LAYOUTS, MODEL_SHAPES, Row, Settings, plan_rows, select_rows, step_description  # noqa: E402
from benchmark_report import report, write_results  # noqa: E402
from benchmark_rows import has_weights  # noqa: E402
from benchmark_shared_data import prepare_data  # noqa: E402
from mft_trainer.attention import TORCH_VARLEN  # noqa: E402
from mft_trainer.gguf_conversion import converted_gguf_checkpoint, is_gguf_path  # noqa: E402

# Dense bf16 peak of an H100/H200 SXM, the MFU denominator (--peak_tflops).
DEFAULT_PEAK_TFLOPS = 989.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the --tiny or full sizes filled in where no flag gave them; a .gguf
    --model is converted once, and a checkpoint --model is its own tokenizer unless --tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="directory of task directories (e.g. examples/data)")
    parser.add_argument("--tokenizer", help="tokenizer directory (e.g. examples/tokenizers/gpt2)")
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
    """The settings every row shares, from the command line."""
    return Settings(
        data=args.data, tokenizer=args.tokenizer, workdir=workdir, model=args.model, seq_length=args.seq_length,
        rows=args.rows, conversations=args.conversations, pad_micro_batch=args.pad_micro_batch, steps=args.steps,
        warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing, learning_rate=args.learning_rate,
        data_split=args.data_split, seed=args.seed, peak_tflops=args.peak_tflops, cpu_threads=args.cpu_threads,
    )


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
    rows = select_rows(plan_rows(env, args.backends.split(",")), args.only, args.skip)
    if args.list:
        print("\n".join(r.name for r in rows))
        return result
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
        write_results(result, args.out)
    result["total_s"] = time.perf_counter() - began
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or read saved results) and report it; exit status 1 when a row failed."""
    args = parse_args(argv)
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
    else:
        result = run(args)
        if args.list:
            return 0
        write_results(result, args.out)
    report(result, args.table, args.plot)
    failed = [r["name"] for r in result["rows"] if "error" in r and not r["error"].startswith("skipped:")]
    if failed:
        print(f"failed rows: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
