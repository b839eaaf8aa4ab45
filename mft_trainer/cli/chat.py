"""Chat with a fine-tuned model, or answer a jsonl file of questions, prompted exactly as in training.

    # interactive, multi-round (a full or merged model, or a LoRA adapter directory)
    python scripts/chat.py --model output/run1 [--system "You are a careful programmer."]

    # batch: one answer per record, written as the record plus {"generated": answer}
    python scripts/chat.py --model output/run1 --input questions.jsonl --output answers.jsonl \\
        [--batch_size 8] [--max_new_tokens 512]

Decoding is greedy unless asked otherwise: `--do_sample --temperature 0.2 --top_p 0.95` samples,
`--num_beams 4` is beam search. Each answer ends at the EOS token the model was trained to emit.

Input records are `{"chat_rounds": [...]}` ending with a user turn (roles as in training data), or
single-turn prompts with one of the keys prompt, instruction, question, query or input (and an
optional system). Every record is checked before anything is generated.

Interactive mode reads one question per line and keeps the conversation: /reset forgets it, /exit
(or end of input) quits. An empty answer is shown as one line that says so (batch output keeps it
as the empty string). `--show_prompt` prints each full prompt first (to stderr), to see exactly
what the model is given. The prompt format is the one the model was trained in: the chat_template
(role_markers, eos_token) of the run_config.yaml that MFTTrainer saves beside the model, or, without
one, the saved tokenizer's own template (MFTCoder's format when it has MFTCoder's template or none).
--chat_template model / mftcoder and --role_markers / --eos_token override it; a base model from
the hub (or a .gguf file) is prompted in its own template.
"""

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence

from transformers import set_seed

from mft_trainer.batch_inference import BatchInputError, run_batch
from mft_trainer.generation import ChatSession, GenerationOptions
from mft_trainer.model_loading import load_model_and_tokenizer, saved_prompt_format
from mft_trainer.model_config import DTYPE_CHOICES
from mft_trainer.terminal_chat import CHAT_COMMANDS, run_interactive
from mft_trainer.rendering import RoleMarkers

logger = logging.getLogger("chat")


def json_object(value: str) -> dict:
    """Parse a JSON object given on the command line (for --role_markers)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"user\": \"<|user|>\\n\"}}', got {value!r}")
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    """Chat as the command line (or `argv`) says; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory, or a LoRA adapter directory")
    parser.add_argument("--base_model", help="base model of an adapter (default: the one the adapter recorded)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="dtype to load the model in")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the checkpoint")
    parser.add_argument("--input", help="jsonl file of questions (batch mode); without it, chat interactively")
    parser.add_argument("--output", help="jsonl file for the answers (batch mode)")
    parser.add_argument("--output_key", default="generated", help="key of the answer in each output record")
    parser.add_argument("--batch_size", type=int, default=8, help="records per generate call (batch mode)")
    parser.add_argument("--system", help="system prompt of the conversation (interactive mode)")
    parser.add_argument("--show_prompt", action="store_true", help="print each full prompt to stderr first")
    parser.add_argument("--echo", action="store_true",
                        help="interactive mode: print each question before its answer (user> / model>), a transcript")
    parser.add_argument("--chat_template", choices=("mftcoder", "model"),
                        help="the prompt format: mftcoder, or model (the saved tokenizer's own template); "
                        "default: the one the model was trained in")
    parser.add_argument("--role_markers", type=json_object,
                        help='turn markers used in training, as JSON: \'{"user": "<|user|>\\n", ...}\'')
    parser.add_argument("--eos_token", help="the token that ends an assistant turn, if training set one")
    parser.add_argument("--seed", type=int, default=42, help="random seed (for sampling)")
    # The generation flags are GenerationOptions' fields, so --help and the library stay in sync.
    generation = parser.add_argument_group("generation")
    types = typing.get_type_hints(GenerationOptions)
    for f in dataclasses.fields(GenerationOptions):
        if types[f.name] is bool:
            generation.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            generation.add_argument(f"--{f.name}", type=types[f.name], default=f.default,
                                    help=f"{f.metadata['help']} (default {f.default})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    # Options: checked before the model is loaded.
    if (args.input is None) != (args.output is None):
        parser.error("batch mode needs both --input and --output")
    try:
        options = GenerationOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationOptions)})
        RoleMarkers.from_config(args.role_markers)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    set_seed(args.seed)

    # Model and tokenizer (base + adapter for an adapter directory); a local path that does not exist
    # fails at once, without asking the hub for it.
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model, base_model=args.base_model, dtype=args.dtype, device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    except FileNotFoundError as e:
        parser.exit(1, f"error: {e}\n")
    try:
        prompt_format = saved_prompt_format(args.model, tokenizer, args.chat_template, args.role_markers, args.eos_token)
    except ValueError as e:  # includes ChatTemplateError
        parser.exit(2, f"error: {e}\n")
    logger.info("prompt format: %s", prompt_format.name)

    # Batch mode: jsonl -> jsonl.
    if args.input is not None:
        try:
            count = run_batch(model, tokenizer, args.input, args.output, options, args.batch_size,
                              output_key=args.output_key, chat_template=prompt_format)
        except BatchInputError as e:
            parser.exit(1, f"error: {e}\n")
        logger.info("wrote %d answers to %s", count, args.output)
        return 0

    # Interactive mode: one question per line, the history carried from round to round.
    session = ChatSession(model, tokenizer, options, system=args.system, chat_template=prompt_format)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Commands: " + ", ".join(CHAT_COMMANDS) + ". One question per line.", file=sys.stderr)
    run_interactive(session, sys.stdin, sys.stdout, show_prompt=sys.stderr if args.show_prompt else None,
                    prompt_prefix="user> " if interactive else "", echo=args.echo and not interactive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
