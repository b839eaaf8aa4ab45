"""Evaluate a tiny model on the eight samples of one_step.py; prints or saves the metrics per loss mode
and batch layout.

In-process from tests/test_trainer.py (the one-process reference) and under torchrun with gloo, where
the eval set (8 samples) does not divide into ranks x batch size, so accelerate completes the last
batches with repeated samples:

    torchrun --nproc_per_node 2 tests/distributed/evaluate.py --out metrics.json --batch_size 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry  # noqa: E402
from mft_trainer.collator import DataCollatorForMFT  # noqa: E402
from tests.distributed.one_step import MODES, TASK_WEIGHTS, VOCAB, make_samples  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402

LAYOUTS = ("padding", "padding_free")
# compute_metrics once, with batch_eval_metrics, on a length-grouped order, on unconcatenated batches
METRICS = {
    "whole set": {},
    "batch by batch": {"batch_eval_metrics": True},
    "length grouped": {"train_sampling_strategy": "group_by_length"},
    "unconcatenated": {"eval_do_concat_batches": False},
}


class CountItems:
    """compute_metrics: how many items the predictions hold and how many trained labels."""

    def __init__(self) -> None:
        self.items, self.trained = 0, 0

    def __call__(self, prediction, compute_result: bool = True) -> dict[str, float]:
        labels = prediction.label_ids
        batches = labels if isinstance(labels, list) else [labels]  # eval_do_concat_batches=False: a list
        assert len(prediction.predictions) == len(labels)
        self.items += sum(len(batch) for batch in batches)
        self.trained += sum(int((batch != -100).sum()) for batch in batches)
        result = {"items": self.items, "trained": self.trained}
        if compute_result:
            self.items, self.trained = 0, 0
        return result


def evaluate(
    mode: str, layout: str, batch_size: int, output_dir: str, metrics: str | None = None
) -> dict[str, float]:
    """The eval metrics (`eval_loss`, `eval_loss/<task>`, and with `metrics` those of CountItems) of
    the eight samples."""
    model = tiny_llama(VOCAB, seed=0, dtype=torch.float64)
    args = MFTConfig(
        output_dir=output_dir,
        weighted_loss_mode=mode,
        task_weights=TASK_WEIGHTS if mode in ("case3", "case4") else None,
        per_device_eval_batch_size=batch_size,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        **(METRICS[metrics] if metrics else {}),
    )
    trainer = MFTTrainer(
        model=model,
        args=args,
        eval_dataset=Dataset.from_list(make_samples()),
        data_collator=DataCollatorForMFT(pad_token_id=0, padding_mode=layout),
        tasks=TaskRegistry.from_names(["a", "b", "c"]),
        compute_metrics=CountItems() if metrics else None,
    )
    results = trainer.evaluate()
    results = {name: value for name, value in results.items() if name.startswith(("eval_loss", "eval_items", "eval_trained"))}
    if metrics:
        predicted = trainer.predict(trainer.eval_dataset)
        labels = predicted.label_ids if isinstance(predicted.label_ids, list) else [predicted.label_ids]
        results["predicted_items"] = sum(len(batch) for batch in labels)
        results["predicted_num_samples"] = predicted.metrics.get("test_samples", len(trainer.eval_dataset))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch_size", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        metrics = {f"{mode} {layout}": evaluate(mode, layout, args.batch_size, output_dir)
                   for mode in MODES for layout in LAYOUTS}
        for variant in METRICS:
            metrics[f"case1 padding {variant}"] = evaluate("case1", "padding", args.batch_size, output_dir, variant)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    Path(args.out).write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
