"""Data preparation at scale: seconds and peak memory to turn N synthetic records of 4 tasks into
packed training rows, ours (build_mft_dataset) vs TRL's (SFTTrainer's dataset preparation).

    python scripts/benchmarks/benchmark_data_prep.py --records 1000000 --out docs/experiments/data_prep
    python scripts/benchmarks/benchmark_data_prep.py --records 2000            # a quick check of the set-up

The records are written once as jsonl in OpenAI/TRL `messages` form (both pipelines read them as
they are): 4 tasks of N/4 records each, of different shapes (one-round questions, chats of 2-3
rounds, code with a system prompt, short answers), seeded. Each pipeline then runs in a process of
its own, with an empty datasets cache in a fresh directory (both write their intermediate Arrow
files to disk, as by default), one process each (num_proc 1), and reports:

- seconds from the jsonl files to packed rows (after imports and the tokenizer load), and the
  CPU seconds of the process over the same span (user + system, all threads), which other work on a
  shared machine does not inflate;
- peak resident memory of the process (ru_maxrss), and its resident memory before the work began;
- rows, tokens and trained tokens, to check that both prepared the same data.

ours: build_mft_dataset(record_format auto, padding_mode "pack", seq_length, data_split "100,0"):
read + validate (datasets.map), render + tokenize + mask, pack (best-fit decreasing).
TRL: load_dataset("json") of the same files, then SFTTrainer(packing=True, packing_strategy="bfd",
max_length=seq_length, assistant_only_loss=True) with our chat template and `{% generation %}`
markers (so that it trains the tokens we train): chat template + tokenize, assistant masks, pack.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = ("qa", "chat", "code", "short")
WORDS = ("the list of values is sorted before it is returned to the caller and each item is checked for "
         "errors while the function keeps a count of the items that were seen in the input string number "
         "value result index parse write read file path buffer table column row").split()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_record(task: str, rng: random.Random, i: int) -> dict:
    if task == "qa":
        turns = [("user", f"Question {i}: {words(rng, 5, 20)}?"), ("assistant", words(rng, 5, 40))]
    elif task == "chat":
        turns = []
        for _ in range(rng.randint(2, 3)):
            turns += [("user", words(rng, 3, 12)), ("assistant", words(rng, 3, 20))]
    elif task == "code":
        body = "\n".join(f"    {words(rng, 2, 6).replace(' ', '_')} = {rng.randint(0, 99)}" for _ in range(rng.randint(1, 6)))
        turns = [("system", "You write Python."), ("user", f"Write f{i}: {words(rng, 4, 12)}."),
                 ("assistant", f"def f{i}(x):\n{body}\n    return x")]
    else:
        turns = [("user", words(rng, 2, 8)), ("assistant", rng.choice(["Yes.", "No.", str(rng.randint(0, 999))]))]
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def write_data(data_dir: Path, records: int, seed: int) -> list[str]:
    """N/4 records per task as data_dir/<task>/train.jsonl (reused when already there)."""
    paths = []
    for task_index, task in enumerate(TASKS):
        path = data_dir / task / "train.jsonl"
        paths.append(str(path.parent))
        marker = data_dir / task / f".complete-{records}-{seed}"
        if marker.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 100 + task_index)
        with open(path, "w", encoding="utf-8") as f:
            for i in range(records // len(TASKS)):
                f.write(json.dumps(make_record(task, rng, i)) + "\n")
        marker.touch()
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(paths: list[str], tokenizer_path: str, seq_length: int) -> dict:
    from transformers import AutoTokenizer

    from mft_trainer import DataConfig, build_mft_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = DataConfig(data_paths=paths, seq_length=seq_length, data_split="100,0", padding_mode="pack",
                        dataset_cache_dir=os.path.join(os.environ["HF_DATASETS_CACHE"], "mft_trainer"))
    before, began, cpu_began = current_rss_mb(), time.perf_counter(), time.process_time()
    data = build_mft_dataset(config, tokenizer)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    total = data.summary.total
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
            "records": total.records,
            "samples": total.samples, "dropped": total.dropped_too_long, "rows": len(data.train),
            "tokens": total.tokens, "trained_tokens": total.trained_tokens}


def run_trl(paths: list[str], tokenizer_path: str, seq_length: int) -> dict:
    import datasets
    import pyarrow.compute as pc
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from mft_trainer import install_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    install_chat_template(tokenizer, generation_markers=True)  # TRL masks what our renderer trains
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    files = [str(Path(p) / "train.jsonl") for p in paths]
    output_dir = tempfile.mkdtemp(prefix="trl_prep_")
    before, began, cpu_began = current_rss_mb(), time.perf_counter(), time.process_time()
    dataset = datasets.load_dataset("json", data_files=files, split="train")
    args = SFTConfig(output_dir=output_dir, report_to=[], use_cpu=True, bf16=False, packing=True,
                     packing_strategy="bfd", max_length=seq_length, assistant_only_loss=True)
    rows = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    table = rows.with_format("arrow")[:]  # counted with pyarrow: no Python lists
    tokens = int(pc.sum(pc.list_value_length(table["input_ids"])).as_py())
    trained = int(pc.sum(pc.not_equal(pc.list_flatten(table["labels"]), -100)).as_py())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
            "records": len(dataset),
            "rows": len(rows), "tokens": tokens, "trained_tokens": trained}


def child(args: argparse.Namespace) -> int:
    paths = json.loads(args.paths)
    run = run_ours if args.pipeline == "ours" else run_trl
    print("RESULT " + json.dumps(run(paths, args.tokenizer, args.seq_length)), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="records in all (4 tasks of records/4)")
    parser.add_argument("--data_dir", default=None, help="where the jsonl files go (default: a temporary directory)")
    parser.add_argument("--tokenizer", default=str(REPO / "examples" / "tokenizers" / "gpt2"))
    parser.add_argument("--seq_length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipelines", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--out", default=None, help="write results.json into this directory")
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline:
        return child(args)

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="prep_data_"))
    began = time.perf_counter()
    paths = write_data(data_dir, args.records, args.seed)
    print(f"data: {args.records} records in {data_dir} ({time.perf_counter() - began:.0f} s to write)", flush=True)
    tokenizer = Path(args.tokenizer).resolve()
    shown_tokenizer = str(tokenizer.relative_to(REPO)) if tokenizer.is_relative_to(REPO) else args.tokenizer
    results = {"records": args.records, "seq_length": args.seq_length, "tokenizer": shown_tokenizer,
               "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}
    for pipeline in args.pipelines.split(","):
        with tempfile.TemporaryDirectory(prefix=f"prep_cache_{pipeline}_") as cache:
            env = {**os.environ, "HF_DATASETS_CACHE": cache, "TOKENIZERS_PARALLELISM": "false"}
            command = [sys.executable, __file__, "--pipeline", pipeline, "--paths", json.dumps(paths),
                       "--tokenizer", args.tokenizer, "--seq_length", str(args.seq_length)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return done.returncode
            result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        results[pipeline] = result
        print(f"{pipeline}: {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU s), peak RSS {result['peak_rss_mb']:.0f} MiB "
              f"(before: {result['rss_before_mb']:.0f} MiB), {result['rows']} rows, {result['tokens']} tokens, "
              f"{result['trained_tokens']} trained", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
