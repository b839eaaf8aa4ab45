"""Where a training step's time goes, per batch layout: one forward + backward of a real model under
torch.profiler, the operators' self time summed into matmuls (the linear layers), attention, the loss
(output layer, softmax, cross-entropy) and the rest, per real token.

It answers the question the benchmark's ratios raise (docs/benchmarks.md): why MFTCoder-style
padding is cheaper per token on a CPU than its padding waste suggests.

    python scripts/benchmarks/profile_layouts.py --model models/SmolLM2-135M-Instruct --data examples/data

The batches are the benchmark's: `--rows` packed rows of `--seq_length` (pack; also joined into one
row: padding_free), and `--conversations` conversations in micro-batches of `--pad_micro_batch`, each
padded to its longest (padding). Each layout runs once untimed, then once profiled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mft_trainer import DataCollatorForMFT, DataConfig, build_mft_dataset  # noqa: E402
from mft_trainer.packing import pack_dataset  # noqa: E402

CATEGORIES = {  # operator name fragments -> category (first match wins: the loss's log_softmax before softmax)
    "loss": ("cross_entropy", "log_softmax", "nll_loss", "logsumexp"),
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "bmm", "baddbmm", "masked_fill",
                  "softmax"),
    "matmul": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul"),
}


def category(name: str) -> str:
    for label, fragments in CATEGORIES.items():
        if any(fragment in name for fragment in fragments):
            return label
    return "other"


def batches(args: argparse.Namespace, tokenizer) -> dict[str, list[dict[str, torch.Tensor]]]:
    tasks = sorted(p for p in Path(args.data).iterdir() if p.is_dir())
    data = build_mft_dataset(DataConfig(data_paths=[str(t) for t in tasks], seq_length=args.seq_length,
                                        data_split="100,0", skip_invalid_records=True), tokenizer)
    rows, _ = pack_dataset(data.train, args.seq_length, seed=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pack_rows = [rows[i] for i in range(args.rows)]
    samples = [data.train[i] for i in range(args.conversations)]
    padding = DataCollatorForMFT(pad_token_id=pad, padding_mode="padding")
    return {
        "pack": [DataCollatorForMFT(pad_token_id=pad, padding_mode="pack")(pack_rows)],
        "padding_free": [DataCollatorForMFT(pad_token_id=pad, padding_mode="padding_free")(pack_rows)],
        "padding": [padding(samples[i:i + args.pad_micro_batch]) for i in range(0, len(samples), args.pad_micro_batch)],
    }


def step(model, micro_batches) -> None:
    """As MFTTrainer runs the model: the batch without the loss's own columns, use_cache off (packed
    rows then get transformers' block-causal mask from their position_ids); the model's plain loss."""
    for batch in micro_batches:
        inputs = {k: v for k, v in batch.items() if k not in ("task_ids", "segment_ids")}
        model(**inputs, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def profile(model, micro_batches) -> dict[str, float]:
    step(model, micro_batches)  # untimed: allocations, kernel choices
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, micro_batches)
    wall = time.perf_counter() - started
    seconds: dict[str, float] = defaultdict(float)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for event in events:
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6
    top = {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in events[:15]}
    real = sum(int((b["segment_ids"] >= 0).sum()) for b in micro_batches)  # -1 on padding
    padded = sum(b["input_ids"].numel() for b in micro_batches)
    return {"wall_s": wall, "real_tokens": real, "padded_tokens": padded,
            "shapes": [list(b["input_ids"].shape) for b in micro_batches], **dict(seconds), "top_operators": top}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local causal LM checkpoint (its tokenizer too)")
    parser.add_argument("--data", required=True, help="directory of task directories")
    parser.add_argument("--seq_length", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--pad_micro_batch", type=int, default=8)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--out", help="write the figures (JSON) here")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.backend)
    model.train()
    results = {name: profile(model, micro) for name, micro in batches(args, tokenizer).items()}
    print("| layout | batch shapes | real tokens | padded tokens | wall s | ms per real token | matmul s | "
          "attention s | loss s | other s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        shapes = " + ".join("x".join(map(str, s)) for s in r["shapes"])
        print(f"| {name} | {shapes} | {r['real_tokens']:,} | {r['padded_tokens']:,} | {r['wall_s']:.1f} | "
              f"{1000 * r['wall_s'] / r['real_tokens']:.1f} | " +
              " | ".join(f"{r.get(c, 0.0):.1f}" for c in ("matmul", "attention", "loss", "other")) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
