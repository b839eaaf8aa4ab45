"""Merge a LoRA adapter into its base model and save a standalone Hugging Face model (`mft-merge`).

    mft-merge --adapter output/run1 --output_dir output/run1-merged \\
        [--base_model Qwen/Qwen2.5-Coder-7B] [--dtype bfloat16]

(in a checkout: `python scripts/merge_lora.py ...`, with the environment's python, e.g. .venv/bin/python)

The result loads with `AutoModelForCausalLM.from_pretrained("output/run1-merged")` and no peft, and
its tokenizer carries the chat template of the training prompt format, so `apply_chat_template`,
vLLM and other servers prompt it exactly as it was trained. `tasks.json` (the run's task registry)
is copied when the adapter directory has one.

The base model defaults to the one the adapter recorded (`base_model_name_or_path` in
adapter_config.json). QLoRA adapters are merged into the unquantized base, loaded in `--dtype`
(bfloat16 for a model trained in bf16; "auto" keeps the checkpoint's dtype). The tokenizer is the
adapter directory's when it has one (training saves it there), else the base model's.

The chat template is the one the adapter was trained in (scripts/chat.py finds it the same way):
with `chat_template: model` or a template file, the saved tokenizer's template, kept as it is; with
MFTCoder's format, the template that training installed, or, when the tokenizer has another one
(a base model's own), MFTCoder's template with `--role_markers`/`--eos_token` (giving either option
always rewrites it). The merged model's generation config stops at the format's end-of-turn token.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mft_trainer.chat_template import install_chat_template, is_mft_chat_template
from mft_trainer.model_loading import adapter_base_model, is_adapter_dir, load_model_and_tokenizer, saved_prompt_format
from mft_trainer.model_config import DTYPE_CHOICES
from mft_trainer.modeling import add_stop_token
from mft_trainer.rendering import MFTCoderFormat
from mft_trainer.paths import check_local_path
from mft_trainer.run_artifacts import RUN_CONFIG_FILE, TASKS_FILE, copy_run_artifacts

logger = logging.getLogger("merge_lora")


def main(argv: Sequence[str] | None = None) -> int:
    """Merge the adapter named in `argv` (default: the command line's arguments); return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the LoRA adapter directory (with adapter_config.json)")
    parser.add_argument("--output_dir", required=True, help="where to save the merged model and tokenizer")
    parser.add_argument("--base_model", help="the base model (path or hub name); default: the adapter's recorded base")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="dtype to load, merge and save in")
    parser.add_argument("--role_markers", type=json.loads,
                        help='turn markers used in training, as JSON: \'{"user": "<|user|>\\n", ...}\'')
    parser.add_argument("--eos_token", help="the token that ends an assistant turn, if training set one")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Check the inputs before loading anything large.
    if not Path(args.adapter).exists():
        parser.error(f"--adapter {args.adapter!r} does not exist")
    if not is_adapter_dir(args.adapter):
        parser.error(f"{args.adapter} is not a LoRA adapter directory (no adapter_config.json)")
    output_dir = Path(args.output_dir)
    if output_dir.resolve() == Path(args.adapter).resolve():
        parser.error("--output_dir must differ from --adapter (the merged model would overwrite the adapter)")
    base_model = args.base_model or adapter_base_model(args.adapter)
    try:
        check_local_path(base_model, "--base_model" if args.base_model else "the adapter's base model")
    except FileNotFoundError as e:
        parser.error(str(e))

    # Base + adapter, then fold the LoRA weights into the base weights.
    logger.info("loading base %s and adapter %s (dtype %s)", base_model, args.adapter, args.dtype)
    # On the CPU: merging is a few matrix products per layer and needs the whole model in memory once.
    model, tokenizer = load_model_and_tokenizer(
        args.adapter, base_model=base_model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code
    )
    merged = model.merge_and_unload()

    # Tokenizer: the template the adapter was trained in. In MFTCoder's format a base model's own
    # template is not the trained format, so MFTCoder's template replaces it.
    prompt_format = saved_prompt_format(args.adapter, tokenizer, role_markers=args.role_markers,
                                        eos_token=args.eos_token)
    if isinstance(prompt_format, MFTCoderFormat) and (
        not is_mft_chat_template(tokenizer.chat_template) or args.role_markers is not None or args.eos_token is not None
    ):
        eos_token = tokenizer.convert_ids_to_tokens(prompt_format.eos_token_id)
        install_chat_template(tokenizer, role_markers=prompt_format.markers, eos_token=eos_token)
        logger.info("installed the chat template of the training prompt format")
    add_stop_token(merged, prompt_format.end_of_turn_token_id)

    # Save a standalone model, the tokenizer, the task registry and the run's resolved recipe (whose
    # prompt format scripts/chat.py reads).
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    copy_run_artifacts(args.adapter, output_dir, (TASKS_FILE, RUN_CONFIG_FILE))
    logger.info("saved the merged model to %s", output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
