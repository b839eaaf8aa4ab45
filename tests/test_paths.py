"""Local paths that do not exist fail at once, named, before anything loads or the hub is asked."""

import json
import runpy
import sys

import pytest
import transformers

import mft_trainer
import mft_trainer.modeling
from mft_trainer.model_loading import load_model_and_tokenizer
from mft_trainer.model_config import ModelConfig
from mft_trainer.modeling import load_model, load_tokenizer
from mft_trainer.paths import check_local_path, looks_local

from .conftest import REPO


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or tokenizer (which would ask the hub for a name it cannot find) fails the test."""

    def not_now(*args, **kwargs):
        raise AssertionError("loaded (or asked the hub) before the path was checked")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", not_now)
    monkeypatch.setattr(mft_trainer, "build_mft_dataset", not_now)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A working directory with output/demo, as after the README demo."""
    (tmp_path / "output" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name,local", [
    ("Qwen/Qwen2.5-Coder-1.5B", False), ("gpt2", False),
    ("/models/qwen", True), ("./qwen", True), ("../qwen", True), ("~/qwen", True), ("models/qwen/7b", True),
    ("output/dmeo", True),  # output/ is a directory here
])
def test_what_counts_as_a_local_path(run_dir, name, local):
    assert looks_local(name) is local


def test_a_mistyped_local_path_names_close_matches(run_dir):
    with pytest.raises(FileNotFoundError, match=r"model 'output/dmeo' does not exist \(did you mean output/demo\?\); "
                                                "it is a local path, not a hub model id"):
        check_local_path("output/dmeo", "model")
    check_local_path("output/demo", "model")  # exists
    check_local_path("someone/model", "model")  # a hub id: left to the hub


def test_loaders_refuse_a_missing_local_path_before_loading(run_dir, no_loading):
    with pytest.raises(FileNotFoundError, match="model 'output/dmeo' does not exist"):
        load_model_and_tokenizer("output/dmeo")
    config = ModelConfig(model_name_or_path="output/demo", tokenizer_name_or_path="./tokenizers/gpt")
    with pytest.raises(FileNotFoundError, match="tokenizer_name_or_path './tokenizers/gpt' does not exist"):
        load_tokenizer(config)
    with pytest.raises(FileNotFoundError, match="model_name_or_path '/no/such/model' does not exist"):
        load_model(ModelConfig(model_name_or_path="/no/such/model"))


def test_an_adapter_whose_recorded_base_is_missing_is_named(run_dir, no_loading):
    (run_dir / "output" / "demo" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    with pytest.raises(FileNotFoundError, match=r"base model \(recorded in output/demo/adapter_config.json\) "
                                                "'/gone/base' does not exist"):
        load_model_and_tokenizer("output/demo")


def run_script(monkeypatch, script, args):
    """Run scripts/<script> here, as its command line would; returns its exit code."""
    monkeypatch.setattr(sys, "argv", [f"scripts/{script}", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    return exit_.value.code


def test_chat_script_with_a_mistyped_model_fails_at_once(run_dir, no_loading, monkeypatch, capsys):
    assert run_script(monkeypatch, "chat.py", ["--model", "output/dmeo"]) == 1
    assert "error: model 'output/dmeo' does not exist (did you mean output/demo?)" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    (["--model_name_or_path", "examples/models/tiny-lama"],
     "model_name_or_path 'examples/models/tiny-lama' does not exist (did you mean examples/models/tiny-llama?)"),
    (["--tokenizer_name_or_path", "/no/tokenizer"], "tokenizer_name_or_path '/no/tokenizer' does not exist"),
    (["--data_paths", "[examples/data/code_qa, examples/data/code_qq]"], "data path 'examples/data/code_qq' does not exist"),
])
def test_train_script_checks_paths_before_loading_anything(no_loading, monkeypatch, capsys, override, message):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(mft_trainer.modeling, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    assert run_script(monkeypatch, "train.py", ["examples/recipes/demo.yaml", *override]) == 2
    assert f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,message", [
    ("tokenizer_name_or_path", "examples/tokenizers/gtp2", "tokenizer 'examples/tokenizers/gtp2' does not exist "
                                                           "(did you mean examples/tokenizers/gpt2?)"),
    ("data_paths", ["examples/data/code_qa", "examples/data/none"], "data path 'examples/data/none' does not exist"),
])
def test_prepare_data_checks_paths_before_loading_anything(tmp_path, no_loading, monkeypatch, capsys, key, value, message):
    import yaml

    monkeypatch.chdir(REPO)
    recipe = {**yaml.safe_load((REPO / "examples/recipes/demo.yaml").read_text()), key: value}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert run_script(monkeypatch, "prepare_data.py", [tmp_path / "recipe.yaml"]) == 2
    assert message in capsys.readouterr().err


def test_merge_lora_names_a_missing_base_model(run_dir, no_loading, monkeypatch, capsys):
    (run_dir / "output" / "demo" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    assert run_script(monkeypatch, "merge_lora.py", ["--adapter", "output/demo", "--output_dir", "merged"]) == 2
    assert "the adapter's base model '/gone/base' does not exist" in capsys.readouterr().err
    assert run_script(monkeypatch, "merge_lora.py", ["--adapter", "output/dmeo", "--output_dir", "merged"]) == 2
    assert "--adapter 'output/dmeo' does not exist" in capsys.readouterr().err
