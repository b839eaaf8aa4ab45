"""Build the multi-task dataset of a recipe and print its per-task summary (`mft-prepare-data`).

    mft-prepare-data examples/recipes/demo_data.yaml [--show_samples 2] [--save_to out/data]

(in a checkout: `python scripts/prepare_data.py ...`, with the environment's python, e.g. .venv/bin/python)

The recipe is YAML with the `DataConfig` fields (see docs/data_format.md) and
`tokenizer_name_or_path` (or `model_name_or_path`). Keys that are not data settings (a training
recipe's optimizer settings, say) are listed as ignored. `--show_samples N` prints N rendered
samples per task with the trained spans marked, to check what the model will learn.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

# build_mft_dataset is called through the package, so that one replaced there (as the tests do) is the one called.
import mft_trainer
from mft_trainer.data_config import DataConfig
from mft_trainer.gguf_conversion import converted_gguf_checkpoint, is_gguf_path
from mft_trainer.paths import check_local_path
from mft_trainer.recipe import RecipeError, load_recipe_file

TRAINED_OPEN, TRAINED_CLOSE = "\u00ab", "\u00bb"  # « » around the tokens that carry loss


def show_sample(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """Decode a sample, wrapping each run of trained tokens in « »."""
    out, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(input_ids[start:i])
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if labels[start] != -100 else text)
            start = i
    return "".join(out)


def iter_samples(dataset):
    """(input_ids, labels, task_id) of every sample, also inside packed rows (a sample starts where
    its position_ids are 0)."""
    for row in dataset:
        if "position_ids" not in row:
            yield row["input_ids"], row["labels"], row["task_id"]
            continue
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            if row["task_ids"][start] >= 0:  # padding at the end of a row has no task
                yield row["input_ids"][start:end], row["labels"][start:end], row["task_ids"][start]


def main(argv: Sequence[str] | None = None) -> int:
    """Build and summarise the dataset of the recipe in `argv` (default: the command line's arguments);
    return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe with the data settings")
    parser.add_argument("--show_samples", type=int, default=0, help="rendered samples to print per task")
    parser.add_argument("--save_to", help="save the train/valid datasets (datasets.save_to_disk) and tasks.json here")
    args = parser.parse_args(argv)

    # The recipe reader of train.py: a duplicate key or a syntax error is reported with file and line.
    try:
        recipe, _ = load_recipe_file(args.recipe)
    except RecipeError as e:
        parser.error(str(e))
    tokenizer_path = recipe.pop("tokenizer_name_or_path", None) or recipe.get("model_name_or_path")
    if tokenizer_path is None:
        parser.error(f"{args.recipe} names no tokenizer: set tokenizer_name_or_path (or model_name_or_path)")
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    ignored = sorted(set(recipe) - data_fields)
    if ignored:
        print(f"ignored (not data settings): {', '.join(ignored)}")
    try:
        config = DataConfig(**{k: v for k, v in recipe.items() if k in data_fields})
        # Paths first: a mistyped one fails here, not after the tokenizer loads (or the hub is asked).
        check_local_path(tokenizer_path, "tokenizer")
        config.check_paths()
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    if is_gguf_path(tokenizer_path):
        tokenizer_path = converted_gguf_checkpoint(tokenizer_path)  # its tokenizer, converted once
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    data = mft_trainer.build_mft_dataset(config, tokenizer)
    print(data.summary)

    if args.show_samples:
        shown = {task_id: 0 for task_id in range(len(data.tasks))}
        for input_ids, labels, task_id in iter_samples(data.train):
            if shown[task_id] >= args.show_samples:
                if all(count >= args.show_samples for count in shown.values()):
                    break
                continue
            shown[task_id] += 1
            name = data.tasks.name_of(task_id)
            print(f"\n--- {name} ({len(input_ids)} tokens; trained spans in {TRAINED_OPEN}{TRAINED_CLOSE}) ---")
            print(show_sample(input_ids, labels, tokenizer))

    if args.save_to:
        out = Path(args.save_to)
        data.train.save_to_disk(str(out / "train"))
        if data.valid is not None:
            data.valid.save_to_disk(str(out / "valid"))
        data.tasks.save(out)
        (out / "summary.json").write_text(json.dumps(data.summary.to_dict(), indent=2) + "\n")
        print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
