"""Multi-task fine-tuning of a causal LM with MFTTrainer, from one recipe.

    torchrun --nproc_per_node 8 scripts/train.py examples/recipes/qwen2.5-coder-7b-lora.yaml
    python scripts/train.py examples/recipes/demo.yaml --max_steps 10      # the README demo, on a CPU
    accelerate launch --config_file fsdp_configs/fsdp2.yaml scripts/train.py recipe.yaml
    python scripts/train.py mftcoder_config.json                            # an MFTCoder JSON config
    python scripts/train.py --help                                          # every recipe key

The recipe is a YAML file of ModelConfig, DataConfig and MFTConfig (TrainingArguments) fields;
`--key value` flags override it. The run saves the model (or LoRA adapter), the tokenizer, the task
registry (tasks.json) and the resolved recipe (run_config.yaml) into output_dir.
"""

import logging
import sys
from dataclasses import asdict

import datasets
import transformers
import yaml
from mft_trainer import MFTTrainer, build_mft_dataset
from mft_trainer.attention import default_attn_implementation  # also registers the torch_varlen backend
from mft_trainer.chat_template import install_chat_template
from mft_trainer.checkpoints import IncompleteCheckpointError, check_checkpoint, last_complete_checkpoint
from mft_trainer.modeling import load_model, load_tokenizer, trainable_parameters
from mft_trainer.recipe import RUN_CONFIG_FILE, RecipeError, check_recipe_paths, help_text, parse_recipe

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


def main(argv: list[str]) -> int:
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

    # --- data ---
    tokenizer = load_tokenizer(model_config)
    # Saved with every checkpoint: apply_chat_template then prompts the model exactly as trained.
    install_chat_template(tokenizer, role_markers=data_config.role_markers, eos_token=data_config.eos_token)
    with args.main_process_first(desc="building the multi-task dataset"):
        data = build_mft_dataset(data_config, tokenizer)
    logger.info("dataset:\n%s", data.summary)

    # --- model ---
    if model_config.attn_implementation is None:
        model_config.attn_implementation = default_attn_implementation(data_config.padding_mode)
        logger.info("attention backend: %s (padding_mode %s)", model_config.attn_implementation, data_config.padding_mode)
    model = load_model(model_config, gradient_checkpointing=args.gradient_checkpointing, vocab_size=len(tokenizer))
    trainable, total = trainable_parameters(model)
    logger.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "global batch: %d samples per optimizer step (%d per device x %d accumulation x %d processes)",
        global_batch, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
    )

    # --- trainer ---
    trainer = MFTTrainer(
        model=model,
        args=args,
        data_collator=data.collator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=data.train,
        eval_dataset=data.valid,
        processing_class=tokenizer,
        tasks=data.tasks,
    )

    # --- train ---
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    # --- save ---
    trainer.save_model(args.output_dir)  # model or adapter, tokenizer, tasks.json
    if trainer.is_world_process_zero():
        resolved = {
            "model": asdict(model_config),
            "data": asdict(data_config),
            "training": args.to_dict(),
            "dataset_summary": data.summary.to_dict(),
        }
        with open(f"{args.output_dir}/{RUN_CONFIG_FILE}", "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)

    # --- evaluate ---
    if data.valid is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            print("\nper-task validation loss (token-mean cross-entropy):")
            for name in data.tasks.names:
                value = metrics.get(f"eval_loss/{name}")
                print(f"  {name:<24} {value:.4f}" if value is not None else f"  {name:<24} (no validation samples)")
            print(f"  {'eval_loss (' + args.weighted_loss_mode + ')':<24} {metrics['eval_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
