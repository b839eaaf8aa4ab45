"""A short `weighted_loss_mode: coba` run of MFTTrainer on hand-made data of three tasks; returns (or
saves) the balancer's state and the training logs.

Used in-process by tests/test_coba.py (one process) and, under torchrun with the gloo backend, for two
data-parallel ranks, each rank saving its own state so that the test can check they are identical:

    torchrun --nproc_per_node 2 tests/distributed/coba_run.py --out coba_state --batch_size 2

The tasks learn at different speeds: `copy` (an answer repeating its prompt's token) is learnt in a
few steps, `count` (consecutive ids) more slowly, and `noise` (random ids) not at all, so CoBa's
weights move away from equal after its short warmup.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry  # noqa: E402
from mft_trainer.collator import DataCollatorForMFT  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402

VOCAB = 64
TASKS = ("copy", "count", "noise")


def task_samples(num_per_task: int, seed: int) -> list[dict]:
    """`num_per_task` samples of each task, interleaved (copy, count, noise, copy, ...)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_per_task):
        for task_id, task in enumerate(TASKS):
            start = int(torch.randint(0, VOCAB, (1,), generator=generator))
            if task == "copy":
                ids = [start] * 9
            elif task == "count":
                ids = [(start + i) % VOCAB for i in range(9)]
            else:
                ids = torch.randint(0, VOCAB, (9,), generator=generator).tolist()
            samples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "task_id": task_id})
    return samples


def coba_trainer(output_dir: str, batch_size: int = 4, eval_batch_size: int = 4, max_steps: int = 10,
                 dtype: torch.dtype | None = torch.float64, **overrides) -> MFTTrainer:
    """An MFTTrainer in coba mode over 24 training and 6 validation samples per task."""
    settings = dict(
        output_dir=output_dir,
        weighted_loss_mode="coba",
        coba_warmup_steps=3,
        coba_history_length=4,
        coba_tau=5.0,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        max_steps=max_steps,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        seed=7,
    )
    settings.update(overrides)
    return MFTTrainer(
        model=tiny_llama(VOCAB, seed=0, dtype=dtype),
        args=MFTConfig(**settings),
        train_dataset=Dataset.from_list(task_samples(24, seed=1)),
        eval_dataset=Dataset.from_list(task_samples(6, seed=2)),
        data_collator=DataCollatorForMFT(pad_token_id=0),
        tasks=TaskRegistry.from_names(TASKS),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="prefix: each rank writes <out>.rank<r>.pt")
    parser.add_argument("--batch_size", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = coba_trainer(output_dir, batch_size=args.batch_size, eval_batch_size=args.batch_size)
        trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"state": trainer.coba.balancer.state_dict(), "logs": trainer.state.log_history}, f"{args.out}.rank{rank}.pt")


if __name__ == "__main__":
    main()
