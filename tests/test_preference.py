"""The preference stage (DPO / ORPO through TRL) in the project's prompt format and model set-up."""

import json
import os
import subprocess
import sys

import pytest

from mft_trainer import build_inference_prompt
from mft_trainer.preference import PreferenceDataConfig, build_preference_dataset
from mft_trainer.records import DataValidationError

from .conftest import REPO, TOKENIZER_DIR
from .helpers import tiny_llama, write_jsonl

pytest.importorskip("trl")

PAIRS = REPO / "examples" / "data_preference" / "code_qa_pairs.jsonl"
SMOLLM2_TOKENIZER = REPO / "examples" / "tokenizers" / "smollm2-135m-instruct"


def first_pair():
    return json.loads(PAIRS.read_text().splitlines()[0])


def test_rows_are_the_inference_prompt_and_the_trained_answer(tokenizer):
    data = build_preference_dataset(PreferenceDataConfig(data_paths=[str(PAIRS)], data_split="100,0"), tokenizer)
    pair = first_pair()
    row = data.train[0]
    assert row["prompt_ids"] == build_inference_prompt(pair["prompt"], tokenizer).input_ids
    assert tokenizer.decode(row["chosen_ids"]) == pair["chosen"] + "\n<|endoftext|>"  # MFTCoder's answer span
    assert tokenizer.decode(row["rejected_ids"]) == pair["rejected"] + "\n<|endoftext|>"


def test_rows_in_the_models_own_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    data = build_preference_dataset(
        PreferenceDataConfig(data_paths=[str(PAIRS)], data_split="100,0", chat_template="model"), tok)
    pair = first_pair()
    row = data.train[0]
    assert row["prompt_ids"] == tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=False)
    assert tok.decode(row["chosen_ids"]) == pair["chosen"] + "<|im_end|>"


def test_bad_comparisons_name_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [first_pair(), {"prompt": "q", "chosen": "a"},
                                               {"prompt": [{"role": "user", "content": "q"}], "chosen": "",
                                                "rejected": "b"}])
    with pytest.raises(DataValidationError) as error:
        build_preference_dataset(PreferenceDataConfig(data_paths=[str(path)]), tokenizer)
    message = str(error.value)
    assert f"{path}:2: expected keys prompt, chosen and rejected" in message
    assert f"{path}:3: 'chosen' must be a non-empty string" in message


def test_an_answer_given_as_one_message_is_an_assistant_turn_in_any_spelling():
    from mft_trainer.preference import parse_preference
    from mft_trainer.records import InvalidRecord

    for role in ("assistant", "bot", "GPT", " Assistant"):
        _, chosen, _ = parse_preference({"prompt": "q", "chosen": [{"role": role, "content": "a"}], "rejected": "b"})
        assert chosen == "a"
    with pytest.raises(InvalidRecord, match="'chosen' must be an assistant message, got role 'user'"):
        parse_preference({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"})


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


def run_stage(tmp_path, base, *extra):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--model_name_or_path", str(base), "--tokenizer_name_or_path",
         str(TOKENIZER_DIR), "--data_paths", str(PAIRS), "--data_split", "90,10", "--output_dir", str(out),
         "--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
         "--logging_steps", "1", "--max_length", "256", "--report_to", "[]", "--use_cpu", "true",
         "--save_strategy", "no", "--dtype", "float32", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "trainer_state.json").read_text())["log_history"]


# Each run is a subprocess of ~1-2 min on 2 cores: DPO with LoRA and ORPO with full fine-tuning cover
# both trainers and both model set-ups.
@pytest.mark.parametrize("stage,peft", [("dpo", "lora"), ("orpo", "none")])
def test_stage_trains_and_saves_as_a_recipe(tmp_path, base, stage, peft):
    import yaml

    out, history = run_stage(tmp_path, base, "--stage", stage, "--peft_type", peft, "--lora_rank", "4")
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 2 and all(isinstance(x, float) for x in losses)
    assert any(k.startswith("rewards/") for entry in history for k in entry)  # the trainer's preference metrics
    assert (out / ("adapter_config.json" if peft == "lora" else "model.safetensors")).exists()
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["stage"] == stage and run_config["data"]["chat_template"] == "mftcoder"


def test_preference_recipes_run_in_full_precision_without_a_bf16_gpu(tmp_path, monkeypatch):
    """TRL's configs turn bf16 on when neither bf16 nor fp16 is set, which stops a run on a CPU;
    the recipe leaves it on only on a bf16 GPU, and a recipe's own setting wins."""
    from mft_trainer import recipe as recipe_module

    argv = [str(REPO / "examples/recipes/smollm2-dpo.yaml"), "--output_dir", str(tmp_path)]
    monkeypatch.setattr(recipe_module, "_bf16_gpu", lambda: False)
    assert recipe_module.parse_recipe(argv).training.bf16 is False
    monkeypatch.setattr(recipe_module, "_bf16_gpu", lambda: True)
    assert recipe_module.parse_recipe(argv + ["--use_cpu", "true", "--bf16", "false"]).training.bf16 is False


@pytest.mark.parametrize("extra,enabled", [([], True), (["--gradient_checkpointing", "false"], False)])
def test_preference_recipes_set_checkpointing_without_a_deprecation_warning(tmp_path, extra, enabled):
    """TRL's configs default gradient_checkpointing to True, a name transformers warns about on every
    run; the recipe passes it under the current name, with TRL's default or the recipe's value."""
    import warnings

    from mft_trainer.recipe import parse_recipe

    argv = [str(REPO / "examples/recipes/smollm2-dpo.yaml"), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
        training = parse_recipe(argv + extra).training
    assert training.gradient_checkpointing is enabled
    assert getattr(training, "activation_checkpointing", enabled) is enabled
