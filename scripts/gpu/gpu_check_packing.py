"""GPU check of packing: real-token throughput and peak memory of padding vs pack vs padding_free,
with the sdpa, flex_attention and torch_varlen (and flash_attention_2, if installed) backends, on a
Qwen2-0.5B-shaped random model; plus, per backend, proof that packed samples stay apart on the device.

Only the project tree travels to the GPU machine, so the data and the tokenizer are arguments. From the
repository root (the wheels and the installer: docs/benchmarks.md, "GPU"; DATA: the four-task data):

    mkdir -p .device && cp -r $DATA .device/data                          # once, here, with .whl/
    # device command (carry .whl and .device); a few minutes on an H100, flex_attention's compiles the most:
    bash .device/install_on_device.sh && export PYTHONPATH=/tmp/site:$PWD && \
      python scripts/gpu/gpu_check_packing.py --data .device/data --tokenizer examples/tokenizers/gpt2 --out $OUT/gpu_check_packing.json

    # on a CPU, to check the script itself (tiny model, a few steps; flex_attention is skipped, torch_varlen
    # runs its pure-torch reference path):
    python scripts/gpu/gpu_check_packing.py --tiny --data examples/data --tokenizer examples/tokenizers/gpt2

Each step is one micro-batch: forward, MFTTrainer.compute_loss (case3), backward and an AdamW step,
in bfloat16 with gradient checkpointing on CUDA. Layouts: `padding` = batches of --pad_batch samples
padded to the longest; `pack` = batches of --rows rows of --seq_length (best-fit packed at build
time); `padding_free` = one row of up to --rows x --seq_length tokens. Throughput counts real
(non-padding) tokens only. Before timing, each backend runs `probe_packing` and the loss of a fixed
set of samples is compared with padding + sdpa, so a leak would show as a large difference.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mft_trainer import DataConfig, MFTConfig, MFTTrainer, build_mft_dataset  # noqa: E402
from mft_trainer.packing_guard import check_packing_support, probe_packing  # noqa: E402  (registers torch_varlen)
from mft_trainer.collator import DataCollatorForMFT  # noqa: E402
from mft_trainer.packing import pack_dataset  # noqa: E402

# Qwen2-0.5B's shape (494M parameters with the 151,936-token vocabulary).
QWEN2_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=32768)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory of task directories (e.g. examples/data)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. examples/tokenizers/gpt2)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: checks the script on a CPU")
    parser.add_argument("--seq_length", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=4,
                        help="rows per pack batch (padding_free: one row of rows x seq_length tokens)")
    parser.add_argument("--pad_batch", type=int, default=8, help="samples per padding batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per layout and backend")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (flex_attention compiles in them)")
    # flex_attention last: it compiles for every new shape, so a timeout leaves the others measured.
    parser.add_argument("--backends", default="sdpa,torch_varlen,flash_attention_2,flex_attention")
    parser.add_argument("--layouts", default="padding,pack,padding_free")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_length, args.rows, args.pad_batch, args.steps, args.warmup = 256, 2, 4, 2, 1
    return args


def build_model(args: argparse.Namespace, vocab_size: int, device: torch.device) -> Qwen2ForCausalLM:
    shape = dict(TINY, vocab_size=vocab_size) if args.tiny else QWEN2_0_5B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:  # initialise on the device: a 0.5B model initialised on the CPU takes minutes
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(dtype)
    if device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def token_budget_batches(dataset: Dataset, order: list[int], budget: int) -> list[list[int]]:
    """Samples, in `order`, grouped into batches of at most `budget` tokens (padding_free rows)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    batches, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + ([current] if current else [])


def batches_for(layout: str, dataset: Dataset, args: argparse.Namespace, pad_id: int, count: int) -> list[dict]:
    """`count` collated batches of `layout`, drawn in a seeded random order (cycling if the data is short)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    if layout == "padding":
        collator = DataCollatorForMFT(pad_id, pad_to_multiple_of=64)
        groups = [order[i : i + args.pad_batch] for i in range(0, len(order) - args.pad_batch + 1, args.pad_batch)]
    elif layout == "pack":
        # Rows padded to seq_length: one shape for every step, so flex_attention compiles once.
        collator = DataCollatorForMFT(pad_id, pad_to_multiple_of=args.seq_length, padding_mode="pack")
        groups = [order[i : i + args.rows] for i in range(0, len(order) - args.rows + 1, args.rows)]
    else:
        budget = args.rows * args.seq_length
        collator = DataCollatorForMFT(pad_id, pad_to_multiple_of=budget, padding_mode="padding_free")
        groups = token_budget_batches(dataset, order, budget)
    return [collator([dataset[i] for i in groups[k % len(groups)]]) for k in range(count)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_trainer(model, tasks, output_dir: str, device: torch.device) -> MFTTrainer:
    args = MFTConfig(output_dir=output_dir, weighted_loss_mode="case3", report_to=[], use_cpu=device.type != "cuda",
                     save_strategy="no", disable_tqdm=True)
    return MFTTrainer(model=model, args=args, data_collator=DataCollatorForMFT(0), tasks=tasks)


def fixed_loss(trainer, model, batch: dict, device: torch.device) -> float:
    """compute_loss of one batch without updating anything."""
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, to_device(batch, device)).item()
    model.train()
    return loss


def as_rows(samples: list[dict], rows: int) -> list[dict]:
    """The samples laid end to end in `rows` packed rows (the dataset's pack layout, by hand)."""
    per_row = math.ceil(len(samples) / rows)
    out = []
    for k in range(0, len(samples), per_row):
        group = samples[k : k + per_row]
        out.append({
            "input_ids": [t for s in group for t in s["input_ids"]],
            "labels": [t for s in group for t in s["labels"]],
            "task_ids": [s["task_id"] for s in group for _ in s["input_ids"]],
            "position_ids": [p for s in group for p in range(len(s["input_ids"]))],
        })
    return out


def loss_difference(trainer, model, backend: str, layout: str, samples: list[dict], pad_id: int, device) -> float:
    """|loss of `samples` in `layout` with `backend` - the same samples padded with sdpa| / the latter.
    A sanity check of the whole path (labels, tasks, segments); leaks are the probe's job, as a
    random model's loss hardly depends on context."""
    model.set_attn_implementation("sdpa")
    reference = fixed_loss(trainer, model, DataCollatorForMFT(pad_id)(samples), device)
    model.set_attn_implementation(backend)
    if layout == "padding":
        loss = fixed_loss(trainer, model, DataCollatorForMFT(pad_id)(samples), device)
    else:
        features = as_rows(samples, rows=2) if layout == "pack" else samples
        loss = fixed_loss(trainer, model, DataCollatorForMFT(pad_id, padding_mode=layout)(features), device)
    return abs(loss - reference) / reference


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_paths = sorted(str(p) for p in Path(args.data).iterdir() if p.is_dir())
    config = DataConfig(data_paths=data_paths, seq_length=args.seq_length, data_split="100,0",
                        skip_invalid_records=True, dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)  # samples: the padding and padding_free layouts
    rows = {layout: data.train for layout in args.layouts.split(",")}
    if "pack" in rows:
        rows["pack"], packing = pack_dataset(data.train, args.seq_length, seed=0)
        print(f"pack: {packing}")
    model = build_model(args, len(tokenizer), device)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {size:.1f}M parameters, {next(model.parameters()).dtype}")
    trainer = make_trainer(model, data.tasks, "/tmp/gpu_check_packing", device)
    # The same samples (of every task) in each layout, for the loss comparison.
    check_samples = [data.train[i] for i in range(0, len(data.train), max(len(data.train) // 32, 1))][:32]
    results = []
    from transformers.utils import is_flash_attn_2_available

    for backend in args.backends.split(","):
        if backend == "flash_attention_2" and not is_flash_attn_2_available():
            print(f"{backend}: skipped (flash-attn is not installed)")
            continue
        if backend == "flex_attention" and device.type != "cuda":
            print(f"{backend}: skipped (no backward on CPU)")
            continue
        model.set_attn_implementation(backend)
        began = time.perf_counter()
        probe = probe_packing(model)
        print(f"{backend}: probe error {probe.error:.3g} vs leak {probe.leak:.3g} -> {'ok' if probe.ok else 'LEAK'} "
              f"({time.perf_counter() - began:.0f}s)")
        for layout, dataset in rows.items():
            if layout == "padding" and backend not in ("sdpa", "flash_attention_2"):
                continue  # padding is the baseline: sdpa (and flash when present) only
            record = {"layout": layout, "backend": backend, "probe_error": probe.error, "probe_leak": probe.leak}
            began = time.perf_counter()
            try:
                if layout != "padding":
                    if not probe.ok:
                        raise RuntimeError("the probe shows packed samples seeing each other")
                    check_packing_support(model, layout, probe=False)
                record["loss_vs_padding_sdpa"] = loss_difference(
                    trainer, model, backend, layout, check_samples, pad_id, device
                )
                batches = batches_for(layout, dataset, args, pad_id, args.warmup + args.steps)
                record.update(time_layout(model, trainer, batches, args, device))
            except Exception as error:  # report and go on: one failing combination must not hide the others
                record["error"] = f"{type(error).__name__}: {error}"[:500]
            record["wall_s"] = round(time.perf_counter() - began, 1)
            print(json.dumps(record), flush=True)
            results.append(record)
            if args.out:  # after every combination, so that a timeout still leaves the results so far
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


def time_layout(model, trainer, batches: list[dict], args: argparse.Namespace, device: torch.device) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    real = padded = 0
    start = 0.0
    loss = torch.zeros(())
    for step, batch in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            real = padded = 0
        batch = to_device(batch, device)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += int((batch["task_ids"] >= 0).sum())
        padded += batch["input_ids"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {
        "steps": args.steps,
        "real_tokens_per_step": real // args.steps,
        "tokens_per_step": padded // args.steps,
        "real_tokens_per_s": round(real / seconds),
        "last_loss": round(loss.item(), 4),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
    }
    del optimizer
    gc.collect()
    return out


def table(results: list[dict]) -> str:
    header = ("layout", "attention", "real tokens/step", "tokens/step", "real tokens/s", "peak GB",
              "loss vs padding+sdpa", "probe error / leak")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['backend']} | error: {r['error'][:120]} | | | | | |")
            continue
        rel = r["loss_vs_padding_sdpa"]
        lines.append(
            f"| {r['layout']} | {r['backend']} | {r['real_tokens_per_step']:,} | {r['tokens_per_step']:,} | "
            f"{r['real_tokens_per_s']:,} | {r['peak_gb'] if r['peak_gb'] is not None else '-'} | "
            f"{rel:.1e} | {r['probe_error']:.2g} / {r['probe_leak']:.2g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    failed = [r for r in results if "error" in r or not math.isfinite(r.get("last_loss", 0.0))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
