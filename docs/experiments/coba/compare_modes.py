"""Per-task validation loss of case1, case3 and coba on the four unbalanced tasks of the data described in docs/benchmarks.md ("The data behind the figures").

One tiny Llama (random init, built from a config) per mode, identical settings and seeds: only
`weighted_loss_mode` changes. Every `--eval_steps` the whole (capped) validation set is evaluated;
the per-task losses go to results.json and the figure to compare_modes.png (one panel per mode, plus
CoBa's weights).

To fit 2 CPU cores, the GPT-2 vocabulary is cut to the `--vocab_size - 1` most frequent token ids of
the training split (each keeps its own id; every other token becomes one shared "rare" id), since the
50k-wide output layer would otherwise cost ten times the rest of the model.

    .venv/bin/python docs/experiments/coba/compare_modes.py                      # train the 3 modes, plot
    .venv/bin/python docs/experiments/coba/compare_modes.py --plot_only          # re-plot results.json

Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from mft_trainer import DataCollatorForMFT, DataConfig, MFTConfig, MFTTrainer, build_mft_dataset  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TASKS = ("code_generation", "code_qa", "multi_round_chat", "code_completion")
MODES = ("case1", "case3", "coba")


def build_data(args: argparse.Namespace, tokenizer):
    data = build_mft_dataset(
        DataConfig(data_paths=[str(DATA / task) for task in TASKS], seq_length=args.seq_length, data_split="90,10",
                   overlength_policy="truncate", skip_invalid_records=True),
        tokenizer,
    )
    # The validation split is ~10% of each task (454 to 14 samples): cap every task at --valid_per_task
    # samples so that a full evaluation stays cheap. The split is already random, so take the first ones.
    kept, seen = [], {}
    for index, task_id in enumerate(data.valid["task_id"]):
        if seen.get(task_id, 0) < args.valid_per_task:
            kept.append(index)
            seen[task_id] = seen.get(task_id, 0) + 1
    valid = data.valid.select(kept)
    if args.vocab_size:
        data.train, valid = shrink_vocabulary(data.train, valid, args.vocab_size)
    return data, valid


def shrink_vocabulary(train, valid, vocab_size: int):
    """Map the `vocab_size - 1` most frequent ids of `train` to 1..vocab_size-1 and the rest to 0."""
    import numpy as np

    counts = np.bincount(np.concatenate([np.asarray(ids) for ids in train["input_ids"]]))
    frequent = np.argsort(-counts)[: vocab_size - 1]
    table = np.zeros(len(counts) + 1, dtype=np.int64)  # ids beyond the training split's largest -> 0 too
    table[frequent] = np.arange(1, vocab_size)

    def remap(batch):
        lookup = lambda ids: table[np.minimum(np.asarray(ids), len(table) - 1)].tolist()  # noqa: E731
        return {"input_ids": [lookup(ids) for ids in batch["input_ids"]],
                "labels": [[label if label == -100 else lookup([label])[0] for label in labels]
                           for labels in batch["labels"]]}

    trained = np.concatenate([np.asarray(labels) for labels in train["labels"]])
    trained = trained[trained != -100]
    coverage = np.isin(trained, frequent).mean()
    print(f"vocabulary: {vocab_size - 1} most frequent ids keep their own id; they cover {coverage:.1%} of the "
          "trained tokens of the training split")
    return train.map(remap, batched=True), valid.map(remap, batched=True)


def tiny_llama(vocab_size: int):
    """Hidden 64, 2 layers, random weights (seed 0): the same initial model for every mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=1024))


def train_mode(mode: str, args: argparse.Namespace, vocab_size: int, data, valid) -> dict:
    config = MFTConfig(
        output_dir=str(args.work_dir / mode), weighted_loss_mode=mode, max_steps=args.max_steps,
        per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=2e-3,
        lr_scheduler_type="constant_with_warmup", warmup_steps=20, weight_decay=0.0,
        eval_strategy="steps", eval_steps=args.eval_steps, eval_on_start=True, logging_steps=args.eval_steps,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        coba_warmup_steps=args.coba_warmup_steps, coba_history_length=args.coba_history_length,
    )
    trainer = MFTTrainer(model=tiny_llama(vocab_size), args=config, train_dataset=data.train, eval_dataset=valid,
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=data.tasks)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    result = {
        "seconds": seconds,
        "steps": [h["step"] for h in evals],
        "valid_loss": {task: [h[f"eval_loss/{task}"] for h in evals] for task in TASKS},
    }
    if mode == "coba":
        logs = [h for h in trainer.state.log_history if "coba_weight/code_qa" in h]
        result["weight_steps"] = [h["step"] for h in logs]
        result["weights"] = {task: [h[f"coba_weight/{task}"] for h in logs] for task in TASKS}
    return result


def summary(results: dict) -> str:
    """Markdown table: final per-task validation loss, and spread = max - min over tasks of final / start."""
    lines = ["| mode | " + " | ".join(TASKS) + " | spread (final / start) | train time (s) |",
             "|---" * (len(TASKS) + 3) + "|"]
    for mode, result in results.items():
        finals = [result["valid_loss"][task][-1] for task in TASKS]
        ratios = [result["valid_loss"][task][-1] / result["valid_loss"][task][0] for task in TASKS]
        cells = [f"{loss:.3f} ({ratio:.3f})" for loss, ratio in zip(finals, ratios)]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {max(ratios) - min(ratios):.3f} | {result['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5 * (len(results) + 1), 4))
    low = min(min(v) for r in results.values() for v in r["valid_loss"].values())
    high = max(max(v[1:]) for r in results.values() for v in r["valid_loss"].values())
    for ax, (mode, result) in zip(axes, results.items()):
        for task in TASKS:
            ax.plot(result["steps"], result["valid_loss"][task], marker=".", label=task)
        ax.set_title(f"{mode}: per-task validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylim(low - 0.1, high + 0.2)  # the step-0 point (the untrained model) is off the top
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("token-mean cross-entropy")
    axes[0].legend()
    ax = axes[-1]
    coba = results.get("coba")
    if coba is not None:
        for task in TASKS:
            ax.plot(coba["weight_steps"], coba["weights"][task], label=task)
        ax.set_title("coba: task weights")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--valid_per_task", type=int, default=48)
    parser.add_argument("--vocab_size", type=int, default=4096, help="0: the full GPT-2 vocabulary")
    parser.add_argument("--coba_warmup_steps", type=int, default=100)
    parser.add_argument("--coba_history_length", type=int, default=200)
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/coba_compare_modes"))
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--plot_only", action="store_true")
    args = parser.parse_args()

    if not args.plot_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(REPO / "examples" / "tokenizers" / "gpt2"))
        data, valid = build_data(args, tokenizer)
        print(data.summary)
        results = json.loads(args.results.read_text()) if args.results.exists() else {}
        vocab_size = args.vocab_size or len(tokenizer)
        for mode in args.modes:
            results[mode] = train_mode(mode, args, vocab_size, data, valid)
            results = {m: results[m] for m in MODES if m in results}
            args.results.write_text(json.dumps(results, indent=1))
            print(f"{mode} done in {results[mode]['seconds']:.0f} s", flush=True)
    results = json.loads(args.results.read_text())
    print(summary(results))
    plot(results, HERE / "compare_modes.png")


if __name__ == "__main__":
    main()
