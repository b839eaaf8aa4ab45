"""CoBa's cost: optimizer-step time with weighted_loss_mode case3 and coba, same model, data and batches.

CoBa adds, after every `coba_update_interval` steps, a no-grad forward pass over
`coba_sample_valid_num` validation batches, and once before training a forward pass over the whole
validation set (L_i(0)). This script times both on the setup of compare_modes.py (tiny Llama, 4,096
ids, the four-task data of docs/benchmarks.md, batch 8, sequences up to 256 tokens):

    .venv/bin/python docs/experiments/coba/overhead.py

Step times are medians over steps 6..N (after warmup of the allocator), measured between consecutive
ends of optimizer steps, so a coba step includes its validation sample; runs alternate case3 / coba
to spread the load of a shared machine over both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_modes import REPO, build_data, tiny_llama  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from mft_trainer import DataCollatorForMFT, MFTConfig, MFTTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    """Time of each optimizer step (end to end), and from train() to the first step."""

    def __init__(self):
        self.start = time.perf_counter()
        self.ends: list[float] = []
        self.train_begin: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.perf_counter()  # after CoBa's L_i(0) pass (its callback runs first)

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run(mode: str, accumulation: int, args: argparse.Namespace, data, valid) -> dict:
    config = MFTConfig(
        output_dir=f"/tmp/coba_overhead/{mode}", weighted_loss_mode=mode, max_steps=args.steps,
        per_device_train_batch_size=8, per_device_eval_batch_size=8, gradient_accumulation_steps=accumulation,
        learning_rate=2e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        logging_steps=args.steps, coba_warmup_steps=5, coba_history_length=200,
    )
    trainer = MFTTrainer(model=tiny_llama(args.vocab_size), args=config, train_dataset=data.train, eval_dataset=valid,
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=data.tasks)
    timer = StepTimer()
    trainer.add_callback(timer)
    timer.start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][5:]
    return {"step": statistics.median(steps), "to_first_step": timer.ends[0] - timer.start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--valid_per_task", type=int, default=48)
    parser.add_argument("--vocab_size", type=int, default=4096)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "examples" / "tokenizers" / "gpt2"))
    data, valid = build_data(args, tokenizer)
    print(f"validation set: {len(valid)} samples")
    rows = []
    for accumulation in (1, 4):
        times = {"case3": [], "coba": []}
        for _ in range(args.repeats):
            for mode in times:
                times[mode].append(run(mode, accumulation, args, data, valid))
        case3 = statistics.median(t["step"] for t in times["case3"])
        coba = statistics.median(t["step"] for t in times["coba"])
        start = statistics.median(t["to_first_step"] for t in times["coba"]) - statistics.median(
            t["to_first_step"] for t in times["case3"])
        rows.append(f"| 8 x {accumulation} | {case3 * 1000:.0f} | {coba * 1000:.0f} | {100 * (coba / case3 - 1):+.0f}% "
                    f"| {start:.1f} |")
    print("| batch x accumulation | case3 step (ms) | coba step (ms) | coba overhead | extra start (s, L_i(0)) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
