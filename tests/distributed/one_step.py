"""One SGD step of MFTTrainer on eight hand-made samples; returns (or saves) the parameter update
and the run's `training_loss`.

Used in-process by tests/test_trainer.py (one process, any batch size / accumulation) and, under
torchrun with the gloo backend, for two data-parallel ranks:

    torchrun --nproc_per_node 2 tests/distributed/one_step.py --out deltas.pt --batch_size 2 --accumulation 2
    torchrun --nproc_per_node 2 tests/distributed/one_step.py --out deltas.pt --deepspeed ds_configs/zero3.json --dtype float32

With SGD at learning rate 1 and no clipping, the update is minus the gradient of the step's loss,
so equal updates mean equal gradients.
"""

from __future__ import annotations

import argparse
import contextlib
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
MODES = ("case1", "case2", "case3", "case4")
# Task of each of the 8 samples, in sampler order. With batch 2: micro-batches [t0 t0] [t1 t0]
# [t2 t2] [t0 t1]; with 2 ranks x accumulation 2, rank 0 gets batches 0 and 2 (no task 1) and
# rank 1 gets batches 1 and 3 (no task 2).
SAMPLE_TASKS = (0, 0, 1, 0, 2, 2, 0, 1)
TASK_WEIGHTS = {"a": 1.0, "b": 3.0, "c": 0.5}


def make_samples(seed: int = 0) -> list[dict]:
    """Eight samples of different lengths, each a prompt (untrained) then an answer (trained)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for task in SAMPLE_TASKS:
        prompt, answer = (int(n) for n in torch.randint(2, 9, (2,), generator=generator))
        ids = torch.randint(0, VOCAB, (prompt + answer,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "task_id": task})
    return samples


def one_step_update(*args, **kwargs) -> dict[str, torch.Tensor]:
    """`one_step(...)`'s parameter update."""
    return one_step(*args, **kwargs)[0]


def one_step(
    mode: str, batch_size: int, accumulation: int, output_dir: str, deepspeed: str | None = None,
    dtype: torch.dtype = torch.float64, fsdp_config: str | None = None, tie_word_embeddings: bool = False,
    loss_implementation: str = "auto", logging_steps: int = 1,
) -> tuple[dict[str, torch.Tensor], float]:
    """Train one optimizer step; return ({parameter name: new value - old value}, training_loss).

    `deepspeed` is a DeepSpeed config path (ZeRO-3 needs float32: it has no float64 support);
    `fsdp_config` an FSDP config path (turns FSDP on); `tie_word_embeddings` shares the output layer's
    weight with the input embedding (Qwen2-0.5B and many small models do). The runs under test take
    the default loss path (chunked for this model); the references take `loss_implementation="plain"`.
    `logging_steps` above 1 leaves the step unlogged, so that `training_loss` comes from the loss
    the Trainer adds at the end of training.
    """
    model = tiny_llama(VOCAB, seed=0, dtype=dtype, tie_word_embeddings=tie_word_embeddings)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = MFTConfig(
        output_dir=output_dir,
        weighted_loss_mode=mode,
        loss_implementation=loss_implementation,
        task_weights=TASK_WEIGHTS if mode in ("case3", "case4") else None,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        logging_steps=logging_steps,
        deepspeed=deepspeed,
        fsdp=fsdp_config is not None,
        fsdp_config=fsdp_config,
    )
    trainer = MFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(make_samples()),
        data_collator=DataCollatorForMFT(pad_token_id=0),
        tasks=TaskRegistry.from_names(["a", "b", "c"]),
    )
    training_loss = trainer.train().training_loss
    gathered = contextlib.nullcontext()
    if deepspeed is not None:
        import deepspeed as ds  # ZeRO-3 keeps only a shard of each parameter per rank

        gathered = ds.zero.GatheredParameters(list(trainer.model.parameters()))
    with gathered:
        # FSDP2 parameters are DTensors: compare their full values.
        full = {name: p.full_tensor() if hasattr(p, "full_tensor") else p for name, p in trainer.model.named_parameters()}
        return {name: value.detach().clone() - before[name] for name, value in full.items()}, training_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--deepspeed", help="a DeepSpeed config, e.g. ds_configs/zero2.json")
    parser.add_argument("--fsdp_config", help="an FSDP config, e.g. fsdp_configs/fsdp2.json")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--tie_word_embeddings", action="store_true")
    parser.add_argument("--logging_steps", type=int, default=1)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    updates, training_losses = {}, {}
    with tempfile.TemporaryDirectory() as output_dir:
        for mode in MODES:
            updates[mode], training_loss = one_step(
                mode, args.batch_size, args.accumulation, output_dir, args.deepspeed, dtype, args.fsdp_config,
                args.tie_word_embeddings, logging_steps=args.logging_steps,
            )
            training_losses[mode] = [training_loss]
            if torch.distributed.is_initialized():  # every rank's own, to check that they agree
                training_losses[mode] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(training_losses[mode], training_loss)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    torch.save({"updates": updates, "training_loss": training_losses}, args.out)


if __name__ == "__main__":
    main()
