"""A training run shows one progress bar: no evaluation bar nested under the training bar in logs."""

import io
from types import SimpleNamespace

import pytest

from mft_trainer.progress import TrainingProgressCallback


class _Loader:
    def __len__(self):
        return 3


@pytest.mark.parametrize("training,terminal,expected", [
    (True, False, False),  # inside train(), output to a log or a notebook: no nested bar
    (True, True, True),  # inside train(), on a terminal: tqdm redraws the nested bar in place
    (False, False, True),  # trainer.evaluate() on its own: its bar is the only one
])
def test_the_evaluation_bar_shows_only_where_it_cannot_garble_the_log(monkeypatch, training, terminal, expected):
    stream = io.StringIO()
    stream.isatty = lambda: terminal
    monkeypatch.setattr("sys.stderr", stream)
    callback = TrainingProgressCallback()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4)
    if training:
        callback.on_train_begin(None, state, None)
    callback.on_prediction_step(None, state, None, eval_dataloader=_Loader())
    assert (callback.prediction_bar is not None) is expected


def test_the_trainer_uses_it_in_place_of_the_default_bar(tmp_path):
    from transformers.trainer_callback import ProgressCallback

    from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry

    from .helpers import tiny_llama

    trainer = MFTTrainer(model=tiny_llama(32), args=MFTConfig(output_dir=str(tmp_path), use_cpu=True),
                         tasks=TaskRegistry.from_names(["a"]), data_collator=lambda rows: rows)
    kinds = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert TrainingProgressCallback in kinds and ProgressCallback not in kinds


@pytest.mark.parametrize("threshold,bars_shown", [(10_000, False), (0, True)])
def test_a_small_data_build_shows_no_data_bars_and_a_large_one_does(monkeypatch, capfd, tmp_path, threshold, bars_shown):
    from transformers import AutoTokenizer

    from mft_trainer import DataConfig, build_mft_dataset
    from mft_trainer import dataset, packing, reading

    from .conftest import REPO

    for module in (dataset, packing, reading):
        monkeypatch.setattr(module, "SMALL_DATA_ROWS", threshold)
    monkeypatch.setattr(reading, "SMALL_DATA_BYTES", threshold)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tokenizers" / "gpt2")
    config = DataConfig(data_paths=[str(REPO / "examples" / "data" / "code_qa")], seq_length=256,
                        padding_mode="pack", data_split="100,0", dataset_cache_dir=str(tmp_path / "cache"))
    build_mft_dataset(config, tokenizer)
    err = capfd.readouterr().err
    for bar in ("Generating train split", "Validating code_qa", "Tokenizing code_qa", "Laying out train rows"):
        assert (bar in err) is bars_shown, (bar, err[-2000:])
