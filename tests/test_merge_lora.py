"""scripts/merge_lora.py: base + LoRA adapter -> one standalone model that computes what the adapter did."""

import copy
import json
import runpy
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mft_trainer import TaskRegistry, build_inference_prompt
from mft_trainer.chat_template import install_chat_template, is_mft_chat_template

from .conftest import REPO
from .helpers import tiny_llama

EOS = 50256
MARKERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
INPUT = torch.tensor([[27, 82, 29, 10734, 198, 5303, 198, 27, 82, 29, 13645, 198, 8226]])  # [1, 13]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A base model on disk (its tokenizer with a template of its own), and a trained-looking adapter:
    non-zero LoRA weights on every linear layer, the tokenizer with the training template, tasks.json."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge")
    base_tok = copy.deepcopy(tokenizer)
    base_tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not the trained format
    tiny_llama(len(tokenizer), bos_token_id=EOS, eos_token_id=EOS).save_pretrained(root / "base")
    base_tok.save_pretrained(root / "base")

    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False,  # random A and B: the adapter really changes the model
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    adapter = get_peft_model(base, config).eval()
    adapter.save_pretrained(root / "adapter")
    train_tok = copy.deepcopy(tokenizer)
    install_chat_template(train_tok, role_markers=MARKERS)  # as training saves it
    train_tok.save_pretrained(root / "adapter")
    TaskRegistry.from_names(["code_qa", "code_generation"]).save(root / "adapter")
    with torch.no_grad():
        adapter_logits = adapter(INPUT).logits
        with adapter.disable_adapter():
            base_logits = adapter(INPUT).logits
    return root, adapter_logits, base_logits


def test_merged_model_is_standalone_and_computes_the_adapter_logits(run):
    root, adapter_logits, base_logits = run
    out = root / "merged"
    result = subprocess.run(
        [sys.executable, "scripts/merge_lora.py", "--adapter", str(root / "adapter"), "--output_dir", str(out),
         "--base_model", str(root / "base"), "--dtype", "float32"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr

    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        merged_logits = merged(INPUT).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter matters ...
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)  # ... and is merged in

    # The tokenizer trained with (the adapter directory's) and its chat template come along.
    tok = AutoTokenizer.from_pretrained(out)
    conversation = [{"role": "user", "content": "Write a sort."}]
    prompt = build_inference_prompt(conversation, tok, role_markers=MARKERS)
    assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == prompt.text
    assert prompt.text.startswith("<|user|>\n")
    assert json.loads((out / "tasks.json").read_text()) == json.loads((root / "adapter" / "tasks.json").read_text())


def test_base_tokenizer_template_is_replaced_and_dtype_applied(run, tmp_path, monkeypatch):
    """An adapter directory without a tokenizer: the base's is used, and its own template (not the
    trained format) is replaced. The base model is the one the adapter recorded."""
    root, _, _ = run
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((root / "adapter" / name).read_bytes())
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", "--adapter", str(adapter), "--output_dir",
                                      str(tmp_path / "merged"), "--dtype", "bfloat16"])
    with pytest.raises(SystemExit) as exit_:  # main() here: a subprocess would re-import torch and peft
        runpy.run_path(str(REPO / "scripts" / "merge_lora.py"), run_name="__main__")
    assert exit_.value.code == 0

    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert is_mft_chat_template(tok.chat_template)
    conversation = [{"role": "human", "content": "hi"}]
    assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == "<s>human\nhi\n<s>bot\n"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16
    assert not (tmp_path / "merged" / "tasks.json").exists()


def test_not_an_adapter_directory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "merge_lora.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert "is not a LoRA adapter directory (no adapter_config.json)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
