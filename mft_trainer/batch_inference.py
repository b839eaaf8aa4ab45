"""Batch inference, jsonl -> jsonl: every record of a file answered, prompted exactly as in training.

Each input record is a record of any format without its answer, read by
`mft_trainer.formats.prompt_messages`: a `chat_rounds`, `messages` or `conversations` list ending
with a user turn, a `prompt` list of messages, or a single-turn prompt (prompt, instruction,
question, query or input, and an optional `system`). Every record is checked before anything is generated; the output is each record, in
input order, plus `{output_key: answer}` (the answer's text as generated, empty or not).
`scripts/chat.py --input ... --output ...` runs it.

>>> options = GenerationOptions(max_new_tokens=256)                                    # doctest: +SKIP
>>> run_batch(model, tok, "questions.jsonl", "answers.jsonl", options)                 # doctest: +SKIP
3
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import decode_json, prompt_messages
from .generation import GenerationOptions, generate_from_prompts, resolve_prompt_format
from .prompt_format import ChatTemplateMode
from .records import InvalidRecord, Problem, RecordError, listed_errors
from .rendering import RoleMarkers
from .segments import InferencePrompt, PromptFormat
from .sources import SourceKind, iter_json_texts

logger = logging.getLogger(__name__)


class BatchInputError(ValueError):
    """A batch-inference file has invalid records (`errors`); the message lists them with their lines."""

    def __init__(self, path: str | os.PathLike, errors: Sequence[RecordError]):
        self.errors = list(errors)
        super().__init__(
            f"{len(self.errors)} invalid record(s) in {path}; nothing was generated:\n{listed_errors(self.errors)}"
        )


@dataclass(frozen=True)
class BatchRequest:
    """A batch-inference record with its prompt."""

    line: int
    record: dict[str, Any]
    prompt: InferencePrompt


def read_batch_requests(
    path: str | os.PathLike,
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    output_key: str = "generated",
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> list[BatchRequest]:
    """Read and check every record of a batch-inference jsonl file, before anything is generated.

    Raises:
        BatchInputError: some records are invalid (each listed with its line and what is wrong).
    """
    prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    requests, errors = [], []
    for line, raw, problem in iter_json_texts(path, SourceKind.JSONL):
        try:
            if problem is not None:
                raise InvalidRecord(Problem.MALFORMED_JSON, problem)
            decoded = decode_json(raw)
            prompt = prompt_format.inference_prompt(prompt_messages(decoded), tokenizer)
            if output_key in decoded:
                raise InvalidRecord(
                    Problem.AMBIGUOUS_FORMAT,
                    f"record already has the output key {output_key!r}; choose another output key",
                )
            requests.append(BatchRequest(line, decoded, prompt))
        except InvalidRecord as e:
            errors.append(RecordError(str(path), line, e.problem, str(e)))
    if errors:
        raise BatchInputError(path, errors)
    return requests


def run_batch(
    model: Any,
    tokenizer: Any,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    output_key: str = "generated",
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> int:
    """Answer every record of a jsonl file; write each record plus `{output_key: answer}` as jsonl.

    Records are written in input order as each batch finishes. Returns the number of records.

    >>> options = GenerationOptions(max_new_tokens=256)                                    # doctest: +SKIP
    >>> run_batch(model, tok, "questions.jsonl", "answers.jsonl", options)                 # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    requests = read_batch_requests(input_path, tokenizer, output_key=output_key, chat_template=prompt_format)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    cut_short = 0
    with open(output_path, "w", encoding="utf-8") as out:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            generations = generate_from_prompts(model, tokenizer, [r.prompt for r in batch], options, prompt_format)
            for request, generation in zip(batch, generations, strict=True):
                out.write(json.dumps({**request.record, output_key: generation.text}, ensure_ascii=False) + "\n")
                cut_short += not generation.stopped_at_eos
            out.flush()  # finished batches survive an interruption
            logger.info("answered %d/%d records", start + len(batch), len(requests))
    if cut_short:
        logger.warning("%d of %d answers hit max_new_tokens before EOS and are cut short", cut_short, len(requests))
    return len(requests)
