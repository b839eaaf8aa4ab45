"""The run artefacts (mft_trainer/run_artifacts.py): every saved model has them, and a run trained
from Python (a notebook, a user's script) is chatted with in the prompt format it was trained in."""

import yaml
from transformers import AutoTokenizer

from mft_trainer import DataConfig, MFTConfig, MFTTrainer, TaskRegistry, build_mft_dataset
from mft_trainer.model_loading import saved_prompt_format
from mft_trainer.prompt_format import build_inference_prompt
from mft_trainer.run_artifacts import (
    copy_run_artifacts,
    read_coba_state,
    read_run_config,
    read_tasks,
    write_coba_state,
    write_run_config,
    write_tasks,
)

from .conftest import REPO
from .helpers import tiny_llama

SMOLLM2_TOKENIZER = REPO / "examples" / "tokenizers" / "smollm2-135m-instruct"  # with its own ChatML template
MARKERS = {"system": "### System\n", "user": "### Question\n", "assistant": "### Answer\n"}


def test_each_artefact_is_written_and_read_back(tmp_path):
    tasks = TaskRegistry.from_names(["a", "b"], weights={"b": 2.0})
    write_tasks(tmp_path / "run", tasks.to_dict())
    assert TaskRegistry.from_dict(read_tasks(tmp_path / "run")) == TaskRegistry.load(tmp_path / "run") == tasks
    assert read_coba_state(tmp_path / "run") is None and read_run_config(tmp_path / "run") == {}
    write_coba_state(tmp_path / "run", {"num_samples": 3, "history": [[1.0, None]]})
    assert read_coba_state(tmp_path / "run") == {"num_samples": 3, "history": [[1.0, None]]}
    write_run_config(tmp_path / "run", {"data": {"chat_template": "model"}, "training": {"seed": 1}})
    assert list(read_run_config(tmp_path / "run")) == ["data", "training"]  # in the order given
    assert copy_run_artifacts(tmp_path / "run", tmp_path / "copy") == ["tasks.json", "coba_state.json",
                                                                       "run_config.yaml"]


def test_a_run_trained_from_python_is_chatted_with_in_its_training_format(tmp_path, example_task_dirs):
    """MFTTrainer(data=...) with no run_config, as in the notebook: MFTCoder's format with custom markers,
    trained with a tokenizer whose own template is ChatML, so the tokenizer alone would prompt wrongly."""
    tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER))
    config = DataConfig(data_paths=example_task_dirs, data_split="80,20", seq_length=256, role_markers=MARKERS,
                        dataset_cache_dir="none")
    data = build_mft_dataset(config, tokenizer)
    args = MFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = MFTTrainer(model=tiny_llama(len(tokenizer)), args=args, data=data, processing_class=tokenizer)
    assert trainer.train_dataset is data.train and trainer.eval_dataset is data.valid and trainer.tasks == data.tasks
    trainer.train()
    trainer.save_model()

    out = tmp_path / "out"
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["data"]["role_markers"] == MARKERS and run_config["data"]["chat_template"] == "mftcoder"
    assert run_config["training"]["max_steps"] == 1 and run_config["dataset_summary"]["tasks"]
    saved = AutoTokenizer.from_pretrained(str(out))
    question = [{"role": "user", "content": "Reverse a string in Python."}]
    trained = build_inference_prompt(question, tokenizer, chat_template=data.prompt_format)
    chatted = build_inference_prompt(question, saved, chat_template=saved_prompt_format(out, saved))
    assert chatted.text == trained.text and chatted.input_ids == trained.input_ids
    assert trained.text.startswith(MARKERS["user"])


def test_a_run_without_data_settings_still_saves_its_training_settings(tmp_path):
    from datasets import Dataset

    from mft_trainer.collator import DataCollatorForMFT

    from .distributed.one_step import make_samples

    args = MFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, weighted_loss_mode="case4")
    trainer = MFTTrainer(model=tiny_llama(64), args=args, train_dataset=Dataset.from_list(make_samples()),
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names("abc"))
    trainer.save_model()
    assert read_run_config(tmp_path) == {"training": yaml.safe_load(yaml.safe_dump(args.to_dict()))}
    assert read_run_config(tmp_path)["training"]["weighted_loss_mode"] == "case4"
    assert TaskRegistry.load(tmp_path).names == ("a", "b", "c")
