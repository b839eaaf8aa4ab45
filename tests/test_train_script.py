"""scripts/train.py end to end: the demo recipe, LoRA, two torchrun ranks, and exact resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.collator import DataCollatorForMFT

from .conftest import REPO
from .test_trainer import free_port
from .distributed.one_step import make_samples
from .helpers import tiny_llama

QUICK = ["--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--seq_length", "256",
         "--per_device_train_batch_size", "2", "--report_to", "[]"]


def run_train(args, tmp_path, launcher=(sys.executable,), timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    return subprocess.run([*launcher, "scripts/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    out = tmp_path / "demo"
    result = run_train(["examples/recipes/tiny.yaml", "--output_dir", str(out), *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_demo_recipe_trains_saves_and_reports_per_task_losses(demo_run):
    out, result = demo_run
    assert "per-task validation loss" in result.stdout
    for task in ("code_generation", "code_qa", "multi_round_chat", "code_completion"):
        assert task in result.stdout.split("per-task validation loss")[1]
    assert TaskRegistry.load(out).names == ("code_generation", "code_qa", "multi_round_chat", "code_completion")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "run_config.yaml").exists()
    assert "global batch: 2 samples per optimizer step" in result.stderr


def test_saved_tokenizer_prompts_as_trained_and_chat_answers(demo_run, tmp_path):
    from transformers import AutoTokenizer

    from mft_trainer import build_inference_prompt

    out, _ = demo_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    conversation = [{"role": "user", "content": "Reverse a string in Python."}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
        build_inference_prompt(conversation, tokenizer).text
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    chat = subprocess.run([sys.executable, "scripts/chat.py", "--model", str(out), "--max_new_tokens", "8"],
                          input="Reverse a string in Python.\n", cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip()  # an answer (a tiny random model's, so no judgement of its content)


def test_lora_run_saves_an_adapter(tmp_path):
    out = tmp_path / "lora"
    result = run_train(["examples/recipes/tiny.yaml", "--output_dir", str(out), "--peft_type", "lora",
                        "--lora_rank", "4", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


SMOLLM2_TOKENIZER = REPO / "examples" / "tokenizers" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_template_lora_run(tmp_path_factory):
    """LoRA on the tiny random Llama, in the SmolLM2 tokenizer's own template (ChatML)."""
    tmp_path = tmp_path_factory.mktemp("model_template")
    out = tmp_path / "run"
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"chat_rounds": [{"role": "user", "content": "2+2?"}, {"role": "bot", "content": "4"}]}) + "\n")
    result = run_train(["examples/recipes/tiny.yaml", "--output_dir", str(out), "--tokenizer_name_or_path",
                        str(SMOLLM2_TOKENIZER), "--chat_template", "model", "--peft_type", "lora", "--lora_rank", "4",
                        "--generation_eval_files", f"{{qa: {qa}}}", "--generation_eval_max_new_tokens", "4",
                        *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_model_template_run_keeps_the_template_and_stops_at_its_end_of_turn(model_template_lora_run):
    from transformers import AutoTokenizer, GenerationConfig

    out, result = model_template_lora_run
    assert "prompt format: the tokenizer's chat template; assistant turns end with token 2 ('<|im_end|>')" in result.stderr
    original = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER).chat_template
    assert AutoTokenizer.from_pretrained(out).chat_template == original  # kept as it was
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert 2 in (eos if isinstance(eos, list) else [eos])
    # generation_eval_files: answered at the end of training, in the same template, and logged
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_gen/qa/exact_match" in entry for entry in history)
    assert (out / "eval_gen" / "step-2.jsonl").exists()


def test_lora_on_a_random_base_saves_the_base_so_merge_and_chat_work(model_template_lora_run, tmp_path):
    """The random base weights are saved with the run; the adapter records them as its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, _ = model_template_lora_run
    base = out / "base_model"
    assert (base / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    chat = subprocess.run([sys.executable, "scripts/chat.py", "--model", str(out), "--max_new_tokens", "4",
                           "--show_prompt"], input="Reverse a string.\n", cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert 'prompt: "<|im_start|>system\\nYou are a helpful AI assistant named SmolLM' in chat.stderr
    assert '<|im_start|>user\\nReverse a string.<|im_end|>\\n<|im_start|>assistant\\n"' in chat.stderr

    merged = tmp_path / "merged"
    merge = subprocess.run([sys.executable, "scripts/merge_lora.py", "--adapter", str(out), "--output_dir", str(merged)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(merged).chat_template == AutoTokenizer.from_pretrained(out).chat_template
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert 2 in (eos if isinstance(eos, list) else [eos])
    assert AutoModelForCausalLM.from_pretrained(merged).config.vocab_size == 50257


def test_bad_recipe_exits_with_a_clear_error(tmp_path):
    result = run_train(["examples/recipes/tiny.yaml", "--learning_rat", "1"], tmp_path)
    assert result.returncode == 2
    assert "did you mean learning_rate" in result.stderr


def test_help_lists_recipe_keys(tmp_path):
    result = run_train(["--help"], tmp_path)
    assert result.returncode == 0 and "--weighted_loss_mode" in result.stdout and "--peft_type" in result.stdout
    # The keys mft-trainer adds come first, TrainingArguments' ~200 after them.
    where = {key: result.stdout.index(f"\n  --{key} (") for key in ("data_paths", "peft_type", "weighted_loss_mode",
                                                                     "output_dir", "learning_rate")}
    assert where["data_paths"] < where["peft_type"] < where["weighted_loss_mode"] < where["output_dir"]
    assert where["weighted_loss_mode"] < where["learning_rate"]


@pytest.mark.distributed
def test_two_process_torchrun_run(tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    result = run_train(["examples/recipes/tiny.yaml", "--output_dir", str(out), "--ddp_backend", "gloo", *QUICK],
                       tmp_path, launcher=launcher, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch: 4 samples per optimizer step (2 per device x 1 accumulation x 2 processes)" in result.stderr
    assert (out / "tasks.json").exists()


def train_steps(output_dir, max_steps, resume_from=None):
    model = tiny_llama(64, seed=0)
    args = MFTConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=2,
                     save_steps=3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=7)
    trainer = MFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(make_samples() * 3),
                         data_collator=DataCollatorForMFT(pad_token_id=0), tasks=TaskRegistry.from_names(["a", "b", "c"]))
    trainer.train(resume_from_checkpoint=resume_from)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_resume_gives_the_uninterrupted_loss_curve_and_weights(tmp_path):
    full_losses, full_params = train_steps(tmp_path / "full", max_steps=6)
    train_steps(tmp_path / "interrupted", max_steps=6)  # writes checkpoint-3 on the way
    resumed_losses, resumed_params = train_steps(tmp_path / "resumed", 6, resume_from=str(tmp_path / "interrupted" / "checkpoint-3"))
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's state
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6), step
    for name in full_params:
        torch.testing.assert_close(resumed_params[name], full_params[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    """A tiny random Qwen2 (biases on q/k/v, as the real ones) saved to disk: QLoRA quantizes as it loads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def qlora_two_ranks(base, tmp_path, name, *backend):
    """2 QLoRA steps of scripts/train.py on 2 torchrun ranks (gloo), evaluating after each; the log history."""
    out = tmp_path / name
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    result = run_train(
        ["--model_name_or_path", str(base), "--tokenizer_name_or_path", "examples/tokenizers/gpt2",
         "--data_paths", "[examples/data/code_generation, examples/data/code_qa]", "--data_split", "90,10",
         "--peft_type", "qlora", "--lora_rank", "8", "--dtype", "float32", "--use_cpu", "true", "--ddp_backend", "gloo",
         "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--logging_steps", "1",
         "--per_device_train_batch_size", "2", "--seq_length", "256", "--learning_rate", "1e-3",
         "--save_strategy", "no", "--report_to", "[]", "--output_dir", str(out), *backend],
        tmp_path, launcher=launcher, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def qlora_ddp_history(qwen2_base, tmp_path_factory):
    return qlora_two_ranks(qwen2_base, tmp_path_factory.mktemp("qlora_ddp"), "ddp")


@pytest.mark.distributed
@pytest.mark.parametrize("backend", [
    ("--deepspeed", "ds_configs/zero2.json"),
    ("--deepspeed", "ds_configs/zero3.json"),
    ("--fsdp", "true", "--fsdp_config", "fsdp_configs/fsdp2_qlora.json"),
], ids=["zero2", "zero3", "fsdp2"])
def test_qlora_under_deepspeed_and_fsdp_trains_as_under_ddp(qwen2_base, qlora_ddp_history, tmp_path, backend):
    """QLoRA (4-bit base, LoRA adapters) sharded by ZeRO-2/3 or FSDP2 on 2 CPU ranks: the same step
    losses, per-task losses, gradient norms and eval losses as plain DDP, step by step."""
    pytest.importorskip("bitsandbytes")
    if backend[0] == "--deepspeed":
        pytest.importorskip("deepspeed")
    history = qlora_two_ranks(qwen2_base, tmp_path, "sharded", *backend)
    keys = ("loss", "grad_norm", "loss/code_generation", "loss/code_qa",
            "eval_loss", "eval_loss/code_generation", "eval_loss/code_qa")
    expected = [{k: v for k, v in entry.items() if k in keys} for entry in qlora_ddp_history]
    got = [{k: v for k, v in entry.items() if k in keys} for entry in history]
    assert sum(len(entry) for entry in expected) == 2 * 7  # two steps, each logged and evaluated
    assert [entry.keys() for entry in got] == [entry.keys() for entry in expected]
    for step, (ours, reference) in enumerate(zip(got, expected)):
        for key in ours:
            assert ours[key] == pytest.approx(reference[key], rel=1e-4), f"entry {step} {key}"
