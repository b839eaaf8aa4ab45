"""The configs with `transformers.HfArgumentParser`, as a user's own training script parses them:
lists and mappings are JSON text on the command line, and native values in a dict or YAML file."""

import pytest
from transformers import HfArgumentParser

from mft_trainer import DataConfig, MFTConfig, ModelConfig

BASE = ["--model_name_or_path", "m", "--data_paths", "examples/data/code_qa", "--output_dir", "out", "--use_cpu",
        "--report_to", "none"]


@pytest.fixture(scope="module")
def parser():
    return HfArgumentParser((ModelConfig, DataConfig, MFTConfig))


@pytest.mark.parametrize("config_class", [ModelConfig, DataConfig, MFTConfig])
def test_each_config_builds_a_parser(config_class):
    HfArgumentParser(config_class)


def test_mappings_and_lists_are_json_on_the_command_line(parser):
    model, data, training = parser.parse_args_into_dataclasses([
        *BASE,
        "--task_weights", '{"code_qa": 2.0}',
        "--generation_eval_files", '{"code_qa": "valid.jsonl"}',
        "--target_modules", '["q_proj", "v_proj"]',
        "--model_config_overrides", '{"attention_dropout": 0.1}',
        "--valid_data_paths", '{"code_qa": ["examples/data/code_qa"]}',
        "--task_sampling", '{"temperature": 2.0}',
        "--max_samples", '{"code_qa": 10}',
        "--role_markers", '{"user": "<|user|>\\n"}',
        "--record_format", '{"code_qa": "chat_rounds"}',
    ])
    assert training.task_weights == {"code_qa": 2.0}
    assert training.generation_eval_files == {"code_qa": "valid.jsonl"}
    assert model.target_modules == ["q_proj", "v_proj"]
    assert model.model_config_overrides == {"attention_dropout": 0.1}
    assert data.valid_data_paths == {"code_qa": ["examples/data/code_qa"]}
    assert data.task_sampling == {"temperature": 2.0}
    assert data.max_samples == {"code_qa": 10}
    assert data.role_markers == {"user": "<|user|>\n"}
    assert data.record_format == {"code_qa": "chat_rounds"}


def test_single_values_of_the_same_fields(parser):
    model, data, training = parser.parse_args_into_dataclasses([
        *BASE, "--target_modules", "all-linear", "--task_sampling", "uniform", "--max_samples", "10",
        "--record_format", "messages",
    ])
    assert model.target_modules == "all-linear"
    assert data.data_paths == "examples/data/code_qa"
    assert (data.task_sampling, data.max_samples, data.record_format) == ("uniform", 10, "messages")
    assert training.task_weights is None


def test_defaults_are_those_of_the_classes(parser):
    model, data, training = parser.parse_args_into_dataclasses(BASE)
    assert (data.task_sampling, data.record_format, data.max_samples) == ("proportional", "auto", None)
    assert model.target_modules is None and model.lora_rank == 96
    assert training.weighted_loss_mode == "case3" and training.gradient_checkpointing is True


def test_a_list_of_data_paths_and_invalid_json_are_reported(parser):
    _, data, _ = parser.parse_args_into_dataclasses(
        [*BASE, "--data_paths", '["examples/data/code_qa", "examples/data/code_generation"]']
    )
    assert data.data_paths == ["examples/data/code_qa", "examples/data/code_generation"]
    with pytest.raises(ValueError, match=r"task_weights: '\{code_qa: 2\}' is not valid JSON"):
        parser.parse_args_into_dataclasses([*BASE, "--task_weights", "{code_qa: 2}"])


def test_parse_dict_and_parse_yaml_file(parser, tmp_path):
    values = {"model_name_or_path": "m", "target_modules": ["q_proj"], "data_paths": {"qa": ["examples/data/code_qa"]},
              "max_samples": {"qa": 3}, "output_dir": "out", "task_weights": {"qa": 2.0}, "use_cpu": True,
              "report_to": "none"}
    model, data, training = parser.parse_dict(values)
    assert (model.target_modules, data.max_samples, training.task_weights) == (["q_proj"], {"qa": 3}, {"qa": 2.0})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\ndata_paths: [examples/data/code_qa]\ntask_sampling: {temperature: 2.0}\n"
                      "output_dir: out\nuse_cpu: true\nreport_to: none\ntask_weights: {code_qa: 2.0}\n")
    model, data, training = parser.parse_yaml_file(recipe)
    assert (data.data_paths, data.task_sampling, training.task_weights) == (
        ["examples/data/code_qa"], {"temperature": 2.0}, {"code_qa": 2.0})
