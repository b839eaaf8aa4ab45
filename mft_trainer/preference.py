"""A preference stage after MFT: DPO or ORPO through TRL, in this project's prompt format.

MFTCoder ships DPO/ORPO after multi-task fine-tuning; here TRL's trainers run it, with three things
of this project: the prompt format of the run (`chat_template`: MFTCoder's markers, the model's own
template or a template file; the prompt tokens are exactly the ones inference sends, and each answer
is exactly the span MFT trains: its content and the end-of-turn token), the model set-up (full, LoRA,
QLoRA through `ModelConfig`, DeepSpeed and FSDP through the training arguments), and the recipe
(`stage: dpo` or `stage: orpo` in a recipe of scripts/train.py, with TRL's DPOConfig / ORPOConfig
fields beside the model and data fields).

Data: jsonl (files or directories), one comparison per line:

    {"prompt": [{"role": "user", "content": "Reverse a string."}], "chosen": "s[::-1]", "rejected": "reversed(s)"}

`prompt` is a conversation that ends with a user turn (roles as in chat_rounds; a string is one user
turn); `chosen` and `rejected` are the two answers, as strings or as a one-message assistant list
(TRL's conversational form).

>>> data = build_preference_dataset(PreferenceDataConfig(data_paths=["prefs.jsonl"]), tokenizer)  # doctest: +SKIP
>>> data.train[0].keys()   # prompt_ids, chosen_ids, rejected_ids                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from datasets import Dataset

from .constants import IGNORE_INDEX
from .prompt_format import check_chat_template_setting, get_prompt_format
from .formats import decode_json
from .records import DataValidationError, InvalidRecord, Message, Problem, RecordError, canonical_role, parse_messages
from .sources import iter_text_lines
from .segments import PromptFormat, tokenize_segments
from .splitting import parse_data_split, split_indices

logger = logging.getLogger(__name__)

STAGES = ("dpo", "orpo")


@dataclass
class PreferenceDataConfig:
    """Data fields of a preference stage. Each field's `help` is what `--help` shows."""

    data_paths: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Preference jsonl files, or directories of them (searched recursively)."}
    )
    data_split: str = field(default="98,2", metadata={"help": 'Train/validation weights, e.g. "98,2".'})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation split."})
    chat_template: str = field(
        default="mftcoder",
        metadata={"help": "The prompt format, as in MFT: mftcoder, model, or a .jinja path (the MFT run's)."},
    )
    role_markers: Optional[dict] = field(default=None, metadata={"help": "MFTCoder turn markers, as in MFT."})
    eos_token: Optional[str] = field(default=None, metadata={"help": "MFTCoder's end-of-answer token, as in MFT."})

    def __post_init__(self) -> None:
        if not self.data_paths:
            raise ValueError("data_paths is required: preference jsonl files (or directories of them)")
        if isinstance(self.data_paths, str):
            self.data_paths = [self.data_paths]
        parse_data_split(self.data_split)
        check_chat_template_setting(self.chat_template, self.role_markers)

    def files(self) -> list[Path]:
        files = []
        for path in map(Path, self.data_paths):
            if not path.exists():
                raise FileNotFoundError(f"preference data path {str(path)!r} does not exist")
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".jsonl") if path.is_dir() else [path]
            if not found:
                raise ValueError(f"preference data directory {str(path)!r} holds no .jsonl file")
            files += found
        return files


def _answer(value: Any, key: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):
        message = value[0]
        if canonical_role(message.get("role")) != "assistant":
            raise InvalidRecord(Problem.UNKNOWN_ROLE, f"'{key}' must be an assistant message, got role {message.get('role')!r}")
        value = message.get("content")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(Problem.EMPTY_CONTENT, f"'{key}' must be a non-empty string (or one assistant message)")
    return value


def parse_preference(record: Any) -> tuple[tuple[Message, ...], str, str]:
    """(prompt turns, chosen, rejected) of one record. Raises `InvalidRecord`."""
    if not isinstance(record, Mapping) or not {"prompt", "chosen", "rejected"} <= set(record):
        found = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise InvalidRecord(Problem.UNKNOWN_FORMAT, f"expected keys prompt, chosen and rejected; found {found}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    messages = parse_messages(prompt, last_role="user", key="prompt")
    return messages, _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")


def preference_ids(
    messages: Sequence[Message], chosen: str, rejected: str, prompt_format: PromptFormat, tokenizer: Any
) -> dict[str, list[int]]:
    """prompt_ids (exactly the inference prompt's tokens) and each answer's ids: the span MFT trains
    after that prompt (content and end-of-turn token)."""
    prompt = prompt_format.inference_prompt(messages, tokenizer).input_ids
    out = {"prompt_ids": prompt}
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        segments = prompt_format.dialogue_segments([*messages, Message("assistant", answer)])
        sample = tokenize_segments([segments], tokenizer, prompt_format.eos_token_id)[0]
        ids, labels = sample["input_ids"][len(prompt):], sample["labels"][len(prompt):]
        if sample["input_ids"][: len(prompt)] != prompt or not any(label != IGNORE_INDEX for label in labels):
            raise InvalidRecord(Problem.MALFORMED_TURN, f"the {key} answer does not follow the prompt's tokens")
        end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
        out[f"{key}_ids"] = ids[:end]
    return out


@dataclass
class PreferenceDataset:
    train: Dataset
    valid: Dataset | None
    prompt_format: PromptFormat


def build_preference_dataset(config: PreferenceDataConfig, tokenizer: Any) -> PreferenceDataset:
    """Read, validate, tokenize (in the run's prompt format) and split the comparisons.

    Raises:
        DataValidationError: invalid records, each with its file and line.
    """
    prompt_format = get_prompt_format(tokenizer, config.chat_template, config.role_markers, config.eos_token)
    rows, errors = [], []
    for path in config.files():
        for line, text, problem in iter_text_lines(path):
            try:
                if problem is not None:
                    raise InvalidRecord(Problem.MALFORMED_JSON, problem)
                rows.append(preference_ids(*parse_preference(decode_json(text)), prompt_format, tokenizer))
            except InvalidRecord as e:
                errors.append(RecordError(str(path), line, e.problem, str(e)))
    if errors:
        raise DataValidationError(errors)
    if not rows:
        raise ValueError(f"no comparison in {config.data_paths}")
    dataset = Dataset.from_list(rows)
    _, valid_fraction = parse_data_split(config.data_split)
    train_indices, valid_indices = split_indices(len(dataset), valid_fraction, config.split_seed, "preference")
    valid = dataset.select(valid_indices) if valid_indices else None
    logger.info("preference data: %d comparisons (%d train, %d valid), prompt format %s", len(dataset),
                len(train_indices), len(valid_indices), prompt_format.name)
    return PreferenceDataset(dataset.select(train_indices), valid, prompt_format)


def _trl_trainers():
    """The TRL trainers, subclassed to take this project's tokenization (imported on use: TRL is optional)."""
    from trl import DPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class MFTDPOTrainer(DPOTrainer):
        """DPOTrainer on rows tokenized by `build_preference_dataset` (no chat template applied by TRL)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            keep = ["prompt_ids", "chosen_ids", "rejected_ids"]
            too_long = [i for i, p in enumerate(dataset["prompt_ids"]) if args.max_length and len(p) >= args.max_length]
            if too_long:
                logger.warning("%s: %d comparisons left out: their prompt alone fills max_length %d", dataset_name,
                               len(too_long), args.max_length)
                dataset = dataset.select(sorted(set(range(len(dataset))) - set(too_long)))
            return dataset.select_columns(keep)

    class MFTORPOTrainer(ORPOTrainer):
        """ORPOTrainer on rows tokenized by `build_preference_dataset`: its `tokenize_row` lays out our ids
        (it would tokenize text and add BOS/EOS tokens of its own)."""

        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for key in ("chosen", "rejected"):
                answer = list(feature[f"{key}_ids"])[: max(0, self.max_length - len(prompt))]
                ids = prompt + answer
                row[f"{key}_input_ids"] = ids
                row[f"{key}_attention_mask"] = [1] * len(ids)
                row[f"{key}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
            return row

    return {"dpo": MFTDPOTrainer, "orpo": MFTORPOTrainer}


def make_preference_trainer(stage: str, model: Any, args: Any, data: PreferenceDataset, tokenizer: Any) -> Any:
    """TRL's DPO or ORPO trainer for this model (a LoRA model: the reference is the model with its
    adapters disabled), on rows tokenized in the run's prompt format.

    ORPO's rows carry strings TRL reads before `tokenize_row`: the prompt and answers as text, which
    are not used beyond that (the ids are).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    trainer_class = _trl_trainers()[stage]
    train, valid = data.train, data.valid
    if stage == "orpo":
        def with_text(row):
            return {"prompt": tokenizer.decode(row["prompt_ids"]), "chosen": tokenizer.decode(row["chosen_ids"]),
                    "rejected": tokenizer.decode(row["rejected_ids"])}

        train = train.map(with_text)
        valid = valid.map(with_text) if valid is not None else None
    return trainer_class(model=model, args=args, train_dataset=train, eval_dataset=valid, processing_class=tokenizer)
