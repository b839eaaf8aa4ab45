"""Multi-task fine-tuning of a causal LM with MFTTrainer, from one recipe (`mft-train`).

    mft-train examples/recipes/demo.yaml                                    # the README demo, on a CPU
    mft-train examples/recipes/tiny.yaml --max_steps 10                    # a tiny random model, seconds
    mft-train mftcoder_config.json                                          # an MFTCoder JSON config
    mft-train --help                                                        # every recipe key
    torchrun --nproc_per_node 8 -m mft_trainer.cli.train examples/recipes/qwen2.5-coder-7b-lora.yaml
    accelerate launch --config_file fsdp_configs/accelerate_fsdp2.yaml -m mft_trainer.cli.train recipe.yaml

`mft-train` is installed with the package (pip install -e .); in a checkout, `python scripts/train.py`
(with the environment's python, e.g. .venv/bin/python) is the same program, and so is
`torchrun ... scripts/train.py`.

The recipe is a YAML file of ModelConfig, DataConfig and MFTConfig (TrainingArguments) fields;
`--key value` flags override it. The run saves the model (or LoRA adapter), the tokenizer with the
chat template it was trained in (`chat_template`), the task registry (tasks.json) and the resolved
recipe (run_config.yaml) into output_dir; the generation config stops at the template's end-of-turn
token. `model_name_or_path` may be a .gguf file (converted once into a trainable checkpoint, cached).
With `eval_on_start: true` the per-task validation losses before and after training are printed.
"""

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import datasets
import transformers

# Called through their modules (mft_trainer.build_mft_dataset, modeling.load_model, ...), not imported
# by name, so that the functions are looked up when the command runs: one replaced on the module (as
# the tests do, to check that nothing loads before the paths are checked) is the one called.
import mft_trainer
from mft_trainer import modeling
from mft_trainer.attention import default_attn_implementation  # also registers the torch_varlen backend
from mft_trainer.chat_template import install_chat_template
from mft_trainer.checkpoints import IncompleteCheckpointError, check_checkpoint, last_complete_checkpoint
from mft_trainer.generation_eval import GenerationEvalCallback, read_generation_eval_sets
from mft_trainer.model_config import ModelConfig
from mft_trainer.modeling import add_stop_token, resolve_model_path, trainable_parameters
from mft_trainer.modes import PeftType
from mft_trainer.prompt_format import ChatTemplateMode, template_source
from mft_trainer.recipe import RecipeError, check_recipe_paths, help_text, parse_recipe
from mft_trainer.run_artifacts import write_generation_config, write_run_config
from mft_trainer.trainer import MFTTrainer

logger = logging.getLogger("mft_trainer.train")


def resolve_checkpoint(requested, output_dir: str):
    """`resume_from_checkpoint: auto` (or true) resumes from the last complete checkpoint in output_dir,
    if any (newer, incomplete ones are skipped with a warning); a named checkpoint must be complete
    (IncompleteCheckpointError), which is checked here, before the data and the model load."""
    if requested is None or str(requested).lower() in ("false", "none", ""):
        return None
    if str(requested).lower() in ("auto", "true", "latest"):
        last = last_complete_checkpoint(output_dir) if output_dir else None
        logger.info("resume_from_checkpoint %s: %s", requested, last or "no complete checkpoint yet, starting fresh")
        return last
    check_checkpoint(requested)
    return requested


def set_chat_template(tokenizer, data_config) -> None:
    """Give the tokenizer the template training writes, so that every checkpoint's tokenizer prompts the
    model exactly as trained: MFTCoder's format as a template, a template file's text, or (model) the
    tokenizer's own template, kept as it is."""
    if data_config.chat_template == ChatTemplateMode.MFTCODER.value:
        install_chat_template(tokenizer, role_markers=data_config.role_markers, eos_token=data_config.eos_token)
    elif data_config.chat_template != ChatTemplateMode.MODEL.value:
        tokenizer.chat_template, _ = template_source(tokenizer, data_config.chat_template)


def materialize_random_base(model_config: ModelConfig, args) -> ModelConfig:
    """LoRA on a random_init model: save the random base weights into output_dir/base_model and train
    the adapter on that checkpoint, so that merge_lora.py and chat.py can load the adapter's base."""
    base_dir = Path(args.output_dir) / "base_model"
    with args.main_process_first(desc="saving the random base model"):
        if args.should_save and not (base_dir / "config.json").is_file():
            random_base = modeling.load_model(dataclasses.replace(model_config, peft_type=PeftType.NONE.value))
            random_base.save_pretrained(base_dir)
    logger.info("random_init with %s: the random base weights are saved in %s (the adapter's base model)",
                model_config.peft_type, base_dir)
    return dataclasses.replace(model_config, model_name_or_path=str(base_dir.resolve()), random_init=False)


def print_task_losses(trainer, tasks, metrics: dict, mode: str) -> None:
    """The per-task validation losses after training, beside those before it (eval_on_start)."""
    before = next((e for e in trainer.state.log_history if e.get("step") == 0 and "eval_loss" in e), None)
    print("\nper-task validation loss (token-mean cross-entropy):")
    print(f"  {'task':<24} {'before':>8} {'after':>8}" if before else f"  {'task':<24} {'after':>8}")
    for name, key in [(name, f"eval_loss/{name}") for name in tasks.names] + [(f"eval_loss ({mode})", "eval_loss")]:
        after = metrics.get(key)
        if after is None:
            print(f"  {name:<24} (no validation samples)")
        elif before and key in before:
            print(f"  {name:<24} {before[key]:>8.4f} {after:>8.4f}")
        else:
            print(f"  {name:<24} {after:>8.4f}")


def train_preference(recipe, resume_from) -> int:
    """The preference stage (`stage: dpo` / `orpo`): TRL's trainer in the run's prompt format."""
    from mft_trainer.preference import build_preference_dataset, make_preference_trainer

    model_config, data_config, args = recipe.model, recipe.data, recipe.training
    with args.main_process_first(desc="converting the GGUF file"):
        model_config = resolve_model_path(model_config)
    tokenizer = modeling.load_tokenizer(model_config)
    set_chat_template(tokenizer, data_config)
    with args.main_process_first(desc="tokenizing the comparisons"):
        data = build_preference_dataset(data_config, tokenizer)
    logger.info("prompt format: %s; answers end with token %d", data.prompt_format.name,
                data.prompt_format.end_of_turn_token_id)
    model = modeling.load_model(
        model_config, gradient_checkpointing=args.gradient_checkpointing, vocab_size=len(tokenizer)
    )
    add_stop_token(model, data.prompt_format.end_of_turn_token_id)
    trainer = make_preference_trainer(recipe.stage, model, args, data, tokenizer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        # What chat.py and merge_lora.py read: the prompt format (and the stage) of this model.
        write_generation_config(args.output_dir, model)
        write_run_config(args.output_dir, {"stage": recipe.stage, "model": asdict(model_config),
                                           "data": asdict(data_config), "training": args.to_dict()})
    if data.valid is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe of `argv` (default: the command line's arguments); return the exit status.

    >>> main(["examples/recipes/tiny.yaml", "--max_steps", "2"])     # doctest: +SKIP
    0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # --- config ---
    if not argv or "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + help_text())
        return 0
    try:
        recipe = parse_recipe(argv)
        check_recipe_paths(recipe)  # a mistyped path fails here, not after tokenization or hub retries
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_config, data_config, args = recipe.model, recipe.data, recipe.training

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Our own progress lines on the main process; transformers and datasets at the recipe's log_level.
    for library_logger in (logger, logging.getLogger("mft_trainer")):
        library_logger.setLevel(logging.INFO if args.should_log else logging.WARNING)
    log_level = args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    for note in recipe.notes:
        logger.info(note)

    # --- seed and checkpoint ---
    transformers.set_seed(args.seed)
    try:
        resume_from = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    except IncompleteCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if recipe.stage != "sft":
        return train_preference(recipe, resume_from)

    # --- data ---
    with args.main_process_first(desc="converting the GGUF file"):
        model_config = resolve_model_path(model_config)  # a .gguf file becomes its converted checkpoint
    tokenizer = modeling.load_tokenizer(model_config)
    # Saved with every checkpoint: apply_chat_template then prompts the model exactly as trained.
    set_chat_template(tokenizer, data_config)
    with args.main_process_first(desc="building the multi-task dataset"):
        data = mft_trainer.build_mft_dataset(data_config, tokenizer)
    logger.info("dataset:\n%s", data.summary)
    logger.info("prompt format: %s; assistant turns end with token %d (%r)", data.prompt_format.name,
                data.prompt_format.end_of_turn_token_id, tokenizer.decode([data.prompt_format.end_of_turn_token_id]))

    # --- model ---
    if model_config.attn_implementation is None:
        model_config.attn_implementation = default_attn_implementation(data_config.padding_mode)
        logger.info("attention backend: %s (padding_mode %s)", model_config.attn_implementation, data_config.padding_mode)
    if model_config.random_init and model_config.peft_type != PeftType.NONE.value:
        model_config = materialize_random_base(model_config, args)
    model = modeling.load_model(
        model_config, gradient_checkpointing=args.gradient_checkpointing, vocab_size=len(tokenizer)
    )
    # Saved with the model: generate() (and servers that read generation_config.json) stop at the end of a turn.
    add_stop_token(model, data.prompt_format.end_of_turn_token_id)
    trainable, total = trainable_parameters(model)
    logger.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "global batch: %d samples per optimizer step (%d per device x %d accumulation x %d processes)",
        global_batch, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
    )

    # --- trainer ---
    # The resolved recipe, saved as run_config.yaml with the model and every checkpoint.
    run_config = {
        "model": asdict(model_config),
        "data": asdict(data_config),
        "training": args.to_dict(),
        "dataset_summary": data.summary.to_dict(),
    }
    trainer = MFTTrainer(
        model=model,
        args=args,
        data_collator=data.collator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=data.train,
        eval_dataset=data.valid,
        processing_class=tokenizer,
        tasks=data.tasks,
        run_config=run_config,
    )
    if args.generation_eval_files:
        trainer.add_callback(GenerationEvalCallback(
            trainer, read_generation_eval_sets(args.generation_eval_files), every_n_steps=args.generation_eval_steps,
            max_new_tokens=args.generation_eval_max_new_tokens, chat_template=data.prompt_format,
        ))

    # --- train ---
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    # --- save ---
    trainer.save_model(args.output_dir)  # model or adapter, tokenizer, run artefacts (then a Hub push)

    # --- evaluate ---
    if data.valid is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            print_task_losses(trainer, data.tasks, metrics, args.weighted_loss_mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
