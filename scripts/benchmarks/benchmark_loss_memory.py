"""Peak memory and time of the loss path: plain (full logits) vs chunked, forward + backward.

The loss path is everything from the last hidden states to their gradient: the output layer, the
per-token cross-entropy, the weighted reduction, and the backward through them. Each path runs in its
own process, so that one path's freed memory cannot hide the other's peak.

    python scripts/benchmarks/benchmark_loss_memory.py                                  # 16,384 tokens x 151,936 vocab x 896
    python scripts/benchmarks/benchmark_loss_memory.py --tokens 4096 --out loss_memory.json   # a size a 24 GiB CPU machine holds
    python scripts/benchmarks/benchmark_loss_memory.py --chunk_size 832,2048,4096             # chunk sizes side by side

On CUDA the peak is `torch.cuda.max_memory_allocated` above what the inputs (hidden states, output
weight) already hold; on the CPU it is the growth of the process's peak resident memory (ru_maxrss)
above its resident memory once the inputs exist, which also counts allocator caching, so it is coarser.
bfloat16 inputs; the output weight is trained (full fine-tuning: its gradient is part of the path).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mft_trainer.chunked_loss import default_chunk_size, linear_cross_entropy  # noqa: E402
from mft_trainer.losses import per_token_cross_entropy  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk_size", default="0",
                        help="positions per chunk, or several comma-separated (one chunked run each); "
                        "0: the library's default for the vocabulary")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--out", help="write both results as JSON here")
    parser.add_argument("--path", choices=["plain", "chunked"], help=argparse.SUPPRESS)  # one child process
    return parser.parse_args(argv)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(args: argparse.Namespace) -> dict:
    """Run one path in this process and return its figures."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) / args.hidden**0.5).to(torch.bfloat16)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    coefficients = torch.full((args.tokens,), 1.0 / args.tokens, device=device)
    chunk_size = int(args.chunk_size) or default_chunk_size(args.vocab)

    def step() -> float:
        if args.path == "plain":
            # As MFTTrainer's plain path: the model's logits, then per_token_cross_entropy on labels that
            # it shifts (so position j predicts labels[j + 1]; the last position has no target).
            logits = torch.nn.functional.linear(hidden, weight)[None]  # [1, N, V]
            labels = torch.cat([targets.new_full((1,), -100), targets[:-1]])[None]  # [1, N]
            per_token = per_token_cross_entropy(logits, labels)[0, 1:]  # [N - 1]
            loss = (per_token * coefficients[:-1]).sum()
        else:
            loss, _ = linear_cross_entropy(hidden[:-1], weight, targets[:-1], coefficients[:-1], chunk_size=chunk_size)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resident_bytes()
    loss = step()  # warm-up; its peak is the path's peak
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_resident_bytes() - base
    began = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / max(args.repeats, 1)
    return {
        "path": args.path,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "chunk_size": chunk_size if args.path == "chunked" else None,
        "peak_gib": round(peak / 2**30, 3),
        "peak_kind": "cuda max_memory_allocated above inputs" if device.type == "cuda" else "ru_maxrss growth (CPU)",
        "seconds_per_step": round(seconds, 4),
        "loss": loss,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.path:
        print(json.dumps(measure(args)))
        return 0
    results = []
    runs = [("plain", "0")] + [("chunked", size) for size in args.chunk_size.split(",")]
    for path, chunk_size in runs:
        command = [sys.executable, __file__, "--path", path, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--chunk_size", chunk_size, "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"path": path, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    plain = results[0]
    print(f"\n{args.tokens:,} tokens x {args.vocab:,} vocab x {args.hidden} hidden, bf16")
    print("| path | chunk | peak GiB | peak / plain | s/step | loss |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['path']} | | error: {r['error'][:100]} | | | |")
            continue
        ratio = f"{r['peak_gib'] / plain['peak_gib']:.1%}" if "error" not in plain and plain["peak_gib"] > 0 else "-"
        print(f"| {r['path']} | {r['chunk_size'] or '-'} | {r['peak_gib']:.2f} | {ratio} | {r['seconds_per_step']:.3f} "
              f"| {r['loss']:.5f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
