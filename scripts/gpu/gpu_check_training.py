"""GPU check of the training combinations that need CUDA: QLoRA under DeepSpeed and FSDP, full
fine-tuning under FSDP, LoRA under ZeRO-3. Each runs `scripts/train.py` for a few steps on a random
Qwen2-0.5B-shaped model saved to disk, and the results (ok or the error, seconds, the last
per-task loss line) go to a JSON file, one line per combination, so a timeout keeps what finished.

    # on the GPU machine (carrying the missing wheels: docs/benchmarks.md, "GPU"):
    python scripts/gpu/gpu_check_training.py --data .device/data --tokenizer examples/tokenizers/gpt2 --out $OUT/training.json
    # here, on the CPU, to check the script itself (tiny model, float32; every combination runs):
    python scripts/gpu/gpu_check_training.py --tiny --data examples/data --tokenizer examples/tokenizers/gpt2 --out /tmp/t.json

The CPU test suite already proves the loss exact under DDP, ZeRO-2/3 and FSDP2 on two ranks, and
QLoRA under ZeRO-2/3 and FSDP2 on two ranks equal to DDP (float32); this script checks what only
CUDA runs: bf16, bitsandbytes' CUDA 4-bit kernels, a 0.5B shape.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name -> recipe overrides; every run also gets the common ones below.
COMBINATIONS = {
    "qlora_ddp": {"peft_type": "qlora"},
    "qlora_zero2": {"peft_type": "qlora", "deepspeed": "ds_configs/zero2.json"},
    "qlora_zero3": {"peft_type": "qlora", "deepspeed": "ds_configs/zero3.json"},
    "qlora_fsdp2": {"peft_type": "qlora", "fsdp": "true", "fsdp_config": "fsdp_configs/fsdp2_qlora.json"},
    "lora_zero3": {"peft_type": "lora", "deepspeed": "ds_configs/zero3.json"},
    "full_fsdp2": {"peft_type": "none", "fsdp": "true", "fsdp_config": "fsdp_configs/fsdp2.json"},
    "full_zero2_pack": {"peft_type": "none", "deepspeed": "ds_configs/zero2.json", "padding_mode": "pack"},
}


def make_model(path: Path, tiny: bool, vocab_size: int) -> None:
    """A random Qwen2 saved to disk (QLoRA quantizes weights as it loads them, so they must exist)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if tiny:
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    else:  # Qwen2-0.5B's shape
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             tie_word_embeddings=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising on the GPU saves minutes for the 0.5B shape
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="directory with one sub-directory per task")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True, help="JSON lines of results")
    parser.add_argument("--tiny", action="store_true", help="tiny model in float32, on the CPU")
    parser.add_argument("--only", nargs="*", help="run only these combinations")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    work = Path(args.out).resolve().parent / "gpu_check_training"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    make_model(model_dir, args.tiny, len(AutoTokenizer.from_pretrained(args.tokenizer)))
    tasks = sorted(str(p) for p in Path(args.data).iterdir() if p.is_dir())
    names = args.only or list(COMBINATIONS)

    common = {
        "model_name_or_path": str(model_dir), "tokenizer_name_or_path": args.tokenizer, "data_paths": json.dumps(tasks),
        "skip_invalid_records": "true", "seq_length": "256" if args.tiny else "2048", "data_split": "98,2",
        "max_steps": str(args.steps), "per_device_train_batch_size": "2", "gradient_accumulation_steps": "2",
        "learning_rate": "1e-4", "logging_steps": "1", "save_strategy": "no", "report_to": "[]",
        "lora_rank": "8", "dtype": "float32" if args.tiny else "bfloat16",
    }
    if args.tiny:
        common["use_cpu"] = "true"
    else:
        common.update({"bf16": "true", "gradient_checkpointing": "true"})

    with open(args.out, "w") as out:
        for name in names:
            settings = {**common, **COMBINATIONS[name], "output_dir": str(work / name)}
            flags = [item for key, value in settings.items() for item in (f"--{key}", value)]
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                       str(REPO / "scripts" / "train.py"), *flags]
            start = time.time()
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "4"})
            losses = [line for line in result.stdout.splitlines() if "'loss/" in line]
            record = {
                "combination": name, "ok": result.returncode == 0, "seconds": round(time.time() - start, 1),
                "last_log": losses[-1] if losses else None,
                "error": None if result.returncode == 0 else result.stderr[-1500:],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"{name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
