"""Recipes: YAML + overrides -> configs, type coercion, clear errors, MFTCoder JSON migration."""

import dataclasses
import json
import re

import pytest
from transformers import TrainingArguments

from mft_trainer.mftcoder import translate_mftcoder_config
from mft_trainer.recipe import RecipeError, help_text, parse_overrides, parse_recipe

BASE = {"model_name_or_path": "some/model", "data_paths": ["data/a", "data/b"], "output_dir": "out", "use_cpu": True}


def write_yaml(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_fields_reach_the_three_configs_with_types_coerced(tmp_path):
    recipe = parse_recipe([write_yaml(tmp_path, """
model_name_or_path: some/model
peft_type: lora
lora_rank: "16"
data_paths: [data/a, data/b]
seq_length: 1024
output_dir: out
learning_rate: 2e-5        # YAML 1.1 reads this as a string
per_device_train_batch_size: "4"
bf16: "false"
use_cpu: true
weighted_loss_mode: task
task_weights: {a: 2}
""")])
    assert recipe.model.peft_type == "lora" and recipe.model.lora_rank == 16
    assert recipe.data.data_paths == ["data/a", "data/b"] and recipe.data.seq_length == 1024
    assert recipe.training.learning_rate == 2e-5 and isinstance(recipe.training.learning_rate, float)
    assert recipe.training.per_device_train_batch_size == 4
    assert recipe.training.bf16 is False
    assert recipe.training.weighted_loss_mode == "case3"
    assert recipe.training.task_weights == {"a": 2}


def test_command_line_overrides_win(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: m\ndata_paths: [x]\noutput_dir: out\nuse_cpu: true\nlearning_rate: 1e-4\n")
    recipe = parse_recipe([path, "--learning_rate", "3e-4", "--max_steps=7", "--data_paths", "[y, z]",
                           "--bf16", "false", "--role_markers", "{user: 'U:'}", "--gradient_checkpointing"])
    assert recipe.training.learning_rate == 3e-4
    assert recipe.training.max_steps == 7
    assert recipe.data.data_paths == ["y", "z"]
    assert recipe.data.role_markers == {"user": "U:"}
    assert recipe.training.gradient_checkpointing is True


@pytest.mark.parametrize("flags", [["--fsdp", "true"], ["--fsdp"], ["--fsdp=True"]])
def test_fsdp_switch_on_the_command_line_means_what_it_means_in_yaml(tmp_path, flags):
    """TrainingArguments types `fsdp` as a string of options, but `fsdp: true` in YAML turns it on."""
    text = "model_name_or_path: m\ndata_paths: [x]\noutput_dir: out\nuse_cpu: true\nfsdp_config: fsdp_configs/fsdp2.json\n"
    path = write_yaml(tmp_path, text)
    (tmp_path / "yaml").mkdir()
    from_yaml = parse_recipe([write_yaml(tmp_path / "yaml", text + "fsdp: true\n")]).training
    from_flags = parse_recipe([path, *flags]).training
    assert from_flags.fsdp == from_yaml.fsdp and from_flags.fsdp
    assert from_flags.fsdp_config == from_yaml.fsdp_config
    assert not parse_recipe([path, "--fsdp", "false"]).training.fsdp


def test_unknown_key_is_an_error_with_suggestions():
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\): 'learning_rat' \(did you mean learning_rate"):
        parse_recipe([f"--{k}={v}" for k, v in BASE.items()] + ["--learning_rat", "1e-4"])


@pytest.mark.parametrize("key,value,message", [
    ("max_steps", "ten", "max_steps: 'ten' is not a valid int"),
    ("max_steps", "1.5", "not a valid int"),
    ("learning_rate", "fast", "not a valid float"),
    ("use_cpu", "maybe", "not a valid bool"),
    ("max_steps", "[3]", r"max_steps: \[3\] is a list, but max_steps takes a single int"),
    ("learning_rate", "{a: 1}", r"learning_rate: \{'a': 1\} is a mapping, but learning_rate takes a single float"),
    ("data_paths", "[a, b", "--data_paths \\[a, b: not a valid YAML list or mapping"),
])
def test_values_of_the_wrong_type_are_errors(key, value, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([f"--{k}={v}" for k, v in {**BASE, key: value}.items()])


def test_list_fields_still_take_lists(tmp_path):
    recipe = parse_recipe([write_yaml(tmp_path, """
model_name_or_path: m
target_modules: [q_proj, v_proj]
data_paths: [data/a]
output_dir: out
use_cpu: true
report_to: [none]
lr_scheduler_kwargs: {min_lr: 0.0}
""")])
    assert recipe.model.target_modules == ["q_proj", "v_proj"] and recipe.training.lr_scheduler_kwargs == {"min_lr": 0.0}


def test_a_list_for_a_single_value_in_yaml_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"max_steps: \[3\] is a list, but max_steps takes a single int"):
        parse_recipe([write_yaml(tmp_path, "model_name_or_path: m\ndata_paths: [x]\noutput_dir: out\nmax_steps: [3]\n")])


def test_a_key_written_twice_is_an_error_with_both_lines(tmp_path):
    path = write_yaml(tmp_path, "model_name_or_path: m\nmax_steps: 3\ndata_paths: [x]\nmax_steps: 5\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:4:1: duplicate key 'max_steps' \(first written at line 2\)"):
        parse_recipe([path])
    nested = write_yaml(tmp_path, "model_name_or_path: m\ntask_weights: {a: 1, a: 2}\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:2:22: duplicate key 'a'"):
        parse_recipe([nested])
    json_path = tmp_path / "recipe.json"
    json_path.write_text('{"max_steps": 3,\n "max_steps": 5}')
    with pytest.raises(RecipeError, match=r"recipe.json: duplicate key 'max_steps'"):
        parse_recipe([str(json_path)])


def test_a_syntax_error_gives_file_and_line(tmp_path):
    # The parser notices on line 4; the unclosed list starts on line 3.
    with pytest.raises(RecipeError, match=r"recipe.yaml:4:11: not valid YAML: expected ',' or '\]', but got ':' "
                                          r"\(while parsing a flow sequence that starts at line 3\)"):
        parse_recipe([write_yaml(tmp_path, "model_name_or_path: m\noutput_dir: out\ndata_paths: [x\nseq_length: 1\n")])
    json_path = tmp_path / "recipe.json"
    json_path.write_text('{"max_steps": 3,\n "seed" 5}')
    with pytest.raises(RecipeError, match=r"recipe.json:2:9: not valid JSON: Expecting ':' delimiter"):
        parse_recipe([str(json_path)])


def test_config_validation_errors_surface_as_recipe_errors():
    with pytest.raises(RecipeError, match="peft_type must be one of"):
        parse_recipe([f"--{k}={v}" for k, v in {**BASE, "peft_type": "adapter"}.items()])
    with pytest.raises(RecipeError, match="data_paths is required"):
        parse_recipe(["--model_name_or_path", "m", "--output_dir", "o", "--use_cpu"])


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=2", "--flag", "--c", "x"]) == {"a": "1", "b": "2", "flag": "true", "c": "x"}
    with pytest.raises(RecipeError, match="--key value"):
        parse_overrides(["stray"])


def test_help_lists_every_section_and_field_help():
    text = help_text()
    for expected in ("ModelConfig:", "DataConfig:", "MFTConfig:", "--lora_rank", "--data_paths", "--weighted_loss_mode",
                     "--learning_rate", "Loss reduction"):
        assert expected in text


def test_help_lists_the_mft_keys_before_those_of_training_arguments():
    text = help_text()
    keys = re.findall(r"^  --(\w+) \(", text, flags=re.MULTILINE)
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    first_inherited = next(i for i, key in enumerate(keys) if key in inherited)
    assert keys[:3] == ["data_paths", "valid_data_paths", "data_split"]
    assert "peft_type" in keys[:first_inherited] and "weighted_loss_mode" in keys[:first_inherited]
    assert "coba_tau" in keys[:first_inherited] and "task_weights" in keys[:first_inherited]
    assert all(key in inherited for key in keys[first_inherited:])
    assert len(keys) == len(set(keys))
    assert text.index("\nMFTConfig: TrainingArguments (transformers)\n") < text.index(f"\n  --{keys[first_inherited]} (")


MFTCODER_CONFIG = {
    "data_paths": "[data/code_qa,data/chat]",
    "output_dir": "out/lora",
    "tb_dir": "out/tb",
    "pretrained_model_path": "models/qwen",
    "model_type": "qwen2",
    "load_raw_dataset": True,
    "data_split": "98,2,0",
    "padding_mode": "padding",
    "weighted_loss_mode": "case3",
    "task_weights": "[1.0,3.0]",
    "peft_type": "qlora",
    "quantization": "4bit",
    "lora_rank": 64,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "learning_rate": 2e-4,
    "min_lr": 2e-5,
    "lr_scheduler_type": "cosine",
    "num_warmup_steps": 30,
    "num_train_epochs": 2,
    "seed": 1234,
    "seq_length": 2048,
    "log_interval": 10,
    "checkpointing_steps": 100,
    "evaluation_steps": 100,
    "early_stopping": True,
    "early_stopping_stall_num": 5,
    "saving_limit": 3,
    "attn_implementation": "sdpa",
    "trust_remote_code": False,
    "world_size": 8,
}


def test_mftcoder_config_translation():
    values, notes = translate_mftcoder_config(MFTCODER_CONFIG)
    assert values["data_paths"] == ["data/code_qa", "data/chat"]
    assert values["model_name_or_path"] == "models/qwen"
    assert values["task_weights"] == {"code_qa": 1.0, "chat": 3.0}
    assert values["lr_scheduler_type"] == "cosine_with_min_lr" and values["lr_scheduler_kwargs"] == {"min_lr": 2e-5}
    assert (values["logging_steps"], values["save_steps"], values["eval_steps"]) == (10, 100, 100)
    assert values["save_strategy"] == values["eval_strategy"] == "steps"
    assert values["warmup_steps"] == 30 and values["save_total_limit"] == 3
    assert values["early_stopping_patience"] == 5
    assert values["quantization"] == "4bit" and values["peft_type"] == "qlora"
    text = "\n".join(notes)
    # what has no meaning here is reported, not silently dropped
    for key in ("tb_dir", "model_type", "world_size"):
        assert f"{key}: no meaning here" in text
    assert "pretrained_model_path -> model_name_or_path" in text


def test_mftcoder_edge_cases():
    values, _ = translate_mftcoder_config({"min_lr": 1e-6, "lr_scheduler_type": "linear", "num_warmup_steps": 0.05})
    assert values["lr_scheduler_type"] == "cosine_with_min_lr" and values["warmup_steps"] == 0.05
    with pytest.raises(ValueError, match="load_raw_dataset false"):
        translate_mftcoder_config({"load_raw_dataset": False, "log_interval": 1})
    with pytest.raises(ValueError, match="does not know"):
        translate_mftcoder_config({"log_interval": 1, "surprise_key": 1})
    with pytest.raises(ValueError, match="2 values but data_paths has 1"):
        translate_mftcoder_config({"data_paths": "[a]", "task_weights": "[1,2]", "log_interval": 1})


def test_mftcoder_json_file_becomes_a_recipe(tmp_path):
    config = {k: v for k, v in MFTCODER_CONFIG.items() if k not in ("early_stopping", "early_stopping_stall_num")}
    config["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "mftcoder.json"
    path.write_text(json.dumps(config))
    recipe = parse_recipe([str(path), "--use_cpu"])
    assert recipe.model.model_name_or_path == "models/qwen" and recipe.model.quantization == "4bit"
    assert recipe.data.data_split == "98,2,0"
    assert recipe.training.lr_scheduler_kwargs == {"min_lr": 2e-5}
    assert recipe.notes[0] == "MFTCoder config translated:"


def test_every_example_recipe_parses(tmp_path):
    """The shipped recipes are valid: every key known, every value of the right type."""
    from .conftest import REPO

    recipes = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        if path.name == "demo_data.yaml":
            continue  # data settings only, for scripts/prepare_data.py
        recipe = parse_recipe([str(path), "--use_cpu", "--output_dir", str(tmp_path / path.stem)])
        assert recipe.model.model_name_or_path, path.name


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md is generated from the config classes; regenerate it when a field changes."""
    import subprocess
    import sys

    from .conftest import REPO

    result = subprocess.run([sys.executable, "scripts/make_config_docs.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
