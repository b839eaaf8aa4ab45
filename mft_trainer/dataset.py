"""Build the multi-task dataset: task files -> validated records -> tokens and masks -> train/valid.

>>> from transformers import AutoTokenizer                                          # doctest: +SKIP
>>> tokenizer = AutoTokenizer.from_pretrained("examples/tokenizers/gpt2")           # doctest: +SKIP
>>> data = build_mft_dataset(DataConfig(data_paths=["examples/data/code_qa",
...                                                 "examples/data/multi_round_chat"]), tokenizer)
>>> print(data.summary)             # per-task samples, tokens, trained tokens, drops, split sizes
>>> data.train[0].keys()            # dict_keys(['input_ids', 'labels', 'task_id'])
>>> data.tasks.names                # ('code_qa', 'multi_round_chat')
>>> collator = data.collator(pad_token_id=tokenizer.eos_token_id)   # matches data.padding_mode

With `DataConfig(padding_mode="pack")` (or "concat") the rows are laid out once here, after the
split (mft_trainer.packing): `data.train[0].keys()` is then input_ids, labels, task_ids and
position_ids, and the summary reports how full the rows are.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets
from datasets.fingerprint import Hasher

from .cache import cache_file_for, safe_file_name
from .collator import DataCollatorForMFT
from .constants import IGNORE_INDEX
from .data_config import DataConfig
from .modes import EmptyAnswers, OverlengthPolicy, PaddingMode
from .mixture import epoch_indices, identity_plan, max_samples_of, samples_per_epoch, subset_indices
from .packing import concat_dataset, pack_dataset
from .reading import TaskRecords, read_task
from .records import DataValidationError, Record, RecordError
from .prompt_format import get_prompt_format
from .segments import PromptFormat, tokenize_segments
from .template_rendering import ChatTemplateError
from .splitting import split_indices
from .summary import DatasetSummary, TaskSummary
from .sources import TaskSources
from .tasks import TaskRegistry, resolve_task_sources
from .progress import SMALL_DATA_ROWS, data_progress_bars

logger = logging.getLogger(__name__)

# Bump when the tokenized layout changes, so that old cache files are not reused.
_CACHE_FORMAT_VERSION = 2
SAMPLE_COLUMNS = ("input_ids", "labels", "task_id")

_STATUS_KEPT = "kept"
_STATUS_TRUNCATED = "truncated"
_STATUS_TOO_LONG = "too_long"
_STATUS_NO_TRAINED = "no_trained_token"

_TOKENIZED_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "task_id": Value("int32"),
        "status": Value("string"),
        "num_tokens": Value("int64"),
        "num_trained_tokens": Value("int64"),
    }
)


@dataclass
class MFTDataset:
    """The built dataset: `train` and `valid` (None when no task has validation samples) hold the
    columns input_ids, labels (-100 where no loss) and task_id; `tasks` maps ids to names.

    With padding_mode "pack" or "concat" each item is a row of several samples instead, with the
    per-token columns input_ids, labels, task_ids and position_ids (mft_trainer.packing).
    """

    train: Dataset
    valid: Dataset | None
    tasks: TaskRegistry
    summary: DatasetSummary
    padding_mode: str = PaddingMode.PADDING.value
    prompt_format: PromptFormat | None = None  # how the conversations were written (config.chat_template)
    config: DataConfig | None = None  # the settings it was built with (saved in the run config)

    def run_config(self) -> dict[str, Any]:
        """What a run config records of this data: the settings it was built with (`data`, whose
        prompt format chat.py reads) and its summary (`dataset_summary`)."""
        settings = {} if self.config is None else {"data": dataclasses.asdict(self.config)}
        return {**settings, "dataset_summary": self.summary.to_dict()}

    def collator(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> DataCollatorForMFT:
        """The collator for these rows: `DataCollatorForMFT` with this dataset's padding_mode."""
        return DataCollatorForMFT(
            pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, padding_mode=self.padding_mode
        )


class _Tokenizer:
    """The `datasets.map` function: render and tokenize a batch of validated records of one task."""

    def __init__(
        self, tokenizer: Any, prompt_format: PromptFormat, config: DataConfig, task_id: int, records: TaskRecords
    ):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        # concat cuts long documents across rows, so no sample is too long for it.
        self.max_length = None if config.splits_long_samples else config.seq_length
        self.truncate = config.overlength_policy == OverlengthPolicy.TRUNCATE.value
        self.task_id = task_id
        self.location = records.location  # names a record in errors

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        records = [
            Record.from_row({"format": f, "messages": m, "text": t})
            for f, m, t in zip(batch["format"], batch["messages"], batch["text"])
        ]
        try:
            segments = self.prompt_format.batch_training_segments(records)
        except ChatTemplateError as e:
            # Name the record: the template's error is about this conversation, not the whole task.
            if e.record_index is None:
                raise
            where = self.location(batch["source"][e.record_index], batch["position"][e.record_index])
            raise ChatTemplateError(f"{where}: {e}") from None
        out: dict[str, list] = {name: [] for name in _TOKENIZED_FEATURES}
        for sample in tokenize_segments(segments, self.tokenizer, self.prompt_format.eos_token_id):
            input_ids, labels, status = sample["input_ids"], sample["labels"], _STATUS_KEPT
            if self.max_length is not None and len(input_ids) > self.max_length:
                if self.truncate:
                    input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
                    has_trained = any(label != IGNORE_INDEX for label in labels)
                    status = _STATUS_TRUNCATED if has_trained else _STATUS_NO_TRAINED
                else:
                    status = _STATUS_TOO_LONG
                if status != _STATUS_TRUNCATED:
                    input_ids, labels = [], []  # dropped: keep only the status, for the counts
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["task_id"].append(self.task_id)
            out["status"].append(status)
            out["num_tokens"].append(len(input_ids))
            out["num_trained_tokens"].append(sum(label != IGNORE_INDEX for label in labels))
        return out


def _cache_dir(config: DataConfig) -> Path | None:
    if config.dataset_cache_dir is not None and config.dataset_cache_dir.lower() == "none":
        return None
    if config.dataset_cache_dir is not None:
        return Path(config.dataset_cache_dir)
    return Path(datasets.config.HF_DATASETS_CACHE) / "mft_trainer"


def _tokenize_task(
    name: str, records: TaskRecords, task_id: int, tokenizer: Any, config: DataConfig, prompt_format: PromptFormat
) -> Dataset:
    raw = records.records
    settings = config.render_settings()
    # The fingerprint of `raw` identifies the validated records (their sources' content, the record
    # format); with the tokenizer, the render settings and the prompt format it identifies the
    # result, so a cached file is reused only when nothing changed.
    key = Hasher.hash([_CACHE_FORMAT_VERSION, raw._fingerprint, tokenizer, settings, prompt_format.cache_key(), task_id])
    cache_file = cache_file_for(_cache_dir(config), f"{safe_file_name(name)}-{key}.arrow")
    with data_progress_bars(len(raw) >= SMALL_DATA_ROWS):
        return raw.map(
            _Tokenizer(tokenizer, prompt_format, config, task_id, records),
            batched=True,
            batch_size=256,
            remove_columns=raw.column_names,
            features=_TOKENIZED_FEATURES,
            num_proc=config.tokenize_num_proc if config.tokenize_num_proc and len(raw) > 1 else None,
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
            new_fingerprint=key,
            desc=f"Tokenizing {name}",
        )


def _count_and_keep(tokenized: Dataset, summary: TaskSummary) -> Dataset:
    """Add the over-length counts and the kept samples' sizes to `summary`; return the kept samples
    (counted with pyarrow: no Python list of a whole column)."""
    table = tokenized.data
    statuses = {str(c["values"]): int(c["counts"]) for c in pc.value_counts(table.column("status")).to_pylist()}
    summary.dropped_too_long += statuses.get(_STATUS_TOO_LONG, 0)
    summary.truncated += statuses.get(_STATUS_TRUNCATED, 0)
    summary.dropped_no_trained_token += statuses.get(_STATUS_NO_TRAINED, 0)
    kept = pc.is_in(table.column("status"), value_set=pa.array([_STATUS_KEPT, _STATUS_TRUNCATED]))
    kept = kept.to_numpy(zero_copy_only=False)  # [N] bool
    if not kept.all():
        tokenized = tokenized.select(np.flatnonzero(kept))
    summary.samples += int(kept.sum())
    summary.tokens += int(table.column("num_tokens").to_numpy()[kept].sum())
    summary.trained_tokens += int(table.column("num_trained_tokens").to_numpy()[kept].sum())
    # The trained-token counts stay until the epoch plan has counted them (_plan_epoch).
    return tokenized.select_columns([*SAMPLE_COLUMNS, "num_trained_tokens"])


def _cap_records(records: TaskRecords, name: str, config: DataConfig, summary: TaskSummary) -> None:
    """Keep a seeded subset of at most max_samples of a task's valid records (before tokenization)."""
    cap = max_samples_of(config.max_samples, name)
    if cap is not None and len(records.records) > cap:
        summary.over_max_samples += len(records.records) - cap
        records.records = records.records.select(subset_indices(len(records.records), cap, config.split_seed, name))


def _plan_epoch(parts: list[Dataset], names: tuple[str, ...], config: DataConfig, summary: DatasetSummary) -> list[Dataset]:
    """Each task's training samples of one epoch of the task mixture (mft_trainer.mixture), and the
    mixture's counts in the summary."""
    rule = config.sampling_rule
    sizes = [len(part) for part in parts]
    counts = samples_per_epoch(rule, names, sizes)
    shares = rule.shares(names, sizes)
    planned = []
    for name, part, count, share in zip(names, parts, counts, shares):
        # Through Arrow: the numpy format converts row by row (8 s for 40k rows).
        trained = part.select_columns(["num_trained_tokens"]).with_format("arrow")[:]["num_trained_tokens"]
        trained = trained.to_numpy().astype(np.int64)  # [n]
        task = summary.task(name)
        task.samples_per_epoch = count
        if identity_plan(len(part), count):
            task.epoch_trained_tokens = int(trained.sum())
            planned.append(part)
            continue
        indices = epoch_indices(len(part), count, config.split_seed, name)
        task.epoch_trained_tokens = int(trained[indices].sum())
        planned.append(part.select(indices))
        if count == 0 and share > 0:
            summary.warnings.append(
                f"task {name!r} has no training sample in an epoch of task_sampling {rule}: its share rounds to 0 of "
                f"{sum(counts)} samples; raise its weight"
            )
    total = sum(summary.task(name).epoch_trained_tokens for name in names)
    for name in names:
        summary.task(name).trained_token_share = summary.task(name).epoch_trained_tokens / total if total else 0.0
    return planned


def _no_sample_left_message(name: str, summary: TaskSummary, config: DataConfig) -> str:
    """Why task `name` kept no sample, and the fixes that the over-length policy in use leaves."""
    if config.overlength_policy == OverlengthPolicy.TRUNCATE.value:
        return (
            f"task {name!r} has no sample left: all {summary.records} are longer than seq_length "
            f"{config.seq_length}, and cut to that length they keep no trained token (their answers start after the "
            "first seq_length tokens, and overlength_policy 'truncate' drops such samples); raise seq_length"
        )
    return (
        f"task {name!r} has no sample left: all {summary.records} are longer than seq_length {config.seq_length} "
        f"(overlength_policy {config.overlength_policy!r}); raise seq_length or use overlength_policy 'truncate'"
    )


def _read_tasks(
    sources: dict[str, TaskSources], summaries: dict[str, TaskSummary], config: DataConfig, warnings: list[str]
) -> dict[str, TaskRecords]:
    records: dict[str, TaskRecords] = {}
    errors: list[RecordError] = []
    error_count = 0
    allow_empty = config.empty_answers == EmptyAnswers.TRAIN.value
    for name, found in sources.items():
        summary = summaries[name]
        for skipped in found.skipped:
            summary.not_read.append(str(skipped))
            if skipped.warn:
                warnings.append(f"task {name!r}: not read: {skipped}")
        task_records = read_task(
            name, found.sources, config.record_format_of(name), allow_empty, _cache_dir(config), config.tokenize_num_proc
        )
        summary.files += len(found.sources)
        summary.sources += [s.label for s in found.sources]
        summary.records += len(task_records.records)
        summary.empty_answers += task_records.empty_answers
        summary.empty_answer_examples += task_records.empty_answer_examples
        summary.skipped_invalid += task_records.error_count
        for reason, count in task_records.skipped_by_problem.items():
            summary.skipped_reasons[reason] = summary.skipped_reasons.get(reason, 0) + count
        errors += task_records.errors
        error_count += task_records.error_count
        records[name] = task_records
    if errors and not config.skip_invalid_records:
        raise DataValidationError(errors, total=error_count)
    for error in errors:
        logger.debug("skipped invalid record %s", error)
    return records


def build_mft_dataset(config: DataConfig, tokenizer: Any) -> MFTDataset:
    """Read, validate, render, tokenize and split every task of `config`.

    Args:
        config: the data settings (paths, seq_length, split, ...).
        tokenizer: a Hugging Face tokenizer (a fast one tokenizes in batches, much faster).

    Returns:
        An `MFTDataset` with the train/valid `datasets.Dataset`s, the task registry and the summary.

    Raises:
        DataValidationError: invalid records (unless `skip_invalid_records`), listing up to 20 with
            their file and line.
        ValueError: a task with no sample (no valid record, or all dropped as over-length), or
            validation data for a task that has no training data.
        ChatTemplateError: the chat template cannot be trained with, or cannot mask a record (its
            file and line are named).
    """
    prompt_format = get_prompt_format(tokenizer, config.chat_template, config.role_markers, config.eos_token)
    train_sources = resolve_task_sources(config.data_paths)
    valid_sources = resolve_task_sources(config.valid_data_paths) if config.valid_data_paths is not None else {}
    unknown = sorted(set(valid_sources) - set(train_sources))
    if unknown:
        raise ValueError(
            f"valid_data_paths has task(s) {unknown} that are not in data_paths (tasks: {list(train_sources)}); "
            "validation tasks must have the same names as training tasks"
        )
    tasks = TaskRegistry.from_names(train_sources)
    summaries = {name: TaskSummary(name=name) for name in tasks.names}
    summary = DatasetSummary(
        tasks=list(summaries.values()),
        seq_length=config.seq_length,
        overlength_policy=config.overlength_policy,
        data_split=config.data_split,
    )

    config.check_task_names(list(tasks.names))
    train_records = _read_tasks(train_sources, summaries, config, summary.warnings)
    valid_records = _read_tasks(valid_sources, summaries, config, summary.warnings)
    for task in summary.tasks:
        if task.empty_answers:
            summary.warnings.append(
                f"task {task.name!r} has {task.empty_answers} empty assistant turn(s) "
                f"({', '.join(task.empty_answer_examples[:3])}{', ...' if task.empty_answers > 3 else ''}): trained "
                "as empty answers, as MFTCoder does (empty_answers: invalid reports them as invalid records instead)"
            )

    train_parts, valid_parts = [], []
    for task_id, name in enumerate(tasks.names):
        task_summary = summaries[name]
        if not len(train_records[name].records):
            raise ValueError(
                f"task {name!r} has no valid record (sources: {[s.label for s in train_sources[name].sources]}, "
                f"{task_summary.skipped_invalid} invalid record(s) skipped)"
            )
        _cap_records(train_records[name], name, config, task_summary)
        train = _count_and_keep(
            _tokenize_task(name, train_records[name], task_id, tokenizer, config, prompt_format), task_summary
        )
        if len(train) == 0:
            raise ValueError(_no_sample_left_message(name, task_summary, config))
        if name in valid_records:
            valid = _count_and_keep(
                _tokenize_task(f"{name} (valid)", valid_records[name], task_id, tokenizer, config, prompt_format),
                task_summary,
            )
        else:
            train_indices, valid_indices = split_indices(len(train), config.valid_fraction, config.split_seed, name)
            valid = train.select(valid_indices)
            train = train.select(train_indices)
            if config.valid_fraction > 0 and len(valid) == 0:
                summary.warnings.append(
                    f"task {name!r} has only {len(train)} sample(s): too few for a validation part at "
                    f"data_split {config.data_split}; it has no validation samples"
                )
        if valid_sources and name not in valid_sources:
            summary.warnings.append(f"task {name!r} has no file in valid_data_paths: it has no validation samples")
        task_summary.train_samples = len(train)
        task_summary.valid_samples = len(valid)
        train_parts.append(train)
        if len(valid):
            valid_parts.append(valid)

    summary.task_sampling = str(config.sampling_rule)
    train = concatenate_datasets(_plan_epoch(train_parts, tasks.names, config, summary)).select_columns(list(SAMPLE_COLUMNS))
    valid = concatenate_datasets(valid_parts).select_columns(list(SAMPLE_COLUMNS)) if valid_parts else None
    summary.padding_mode = config.padding_mode
    if config.padding_mode in (PaddingMode.PACK.value, PaddingMode.CONCAT.value):
        # Once, after the split, so that validation samples never share a row with training ones.
        layout = pack_dataset if config.padding_mode == PaddingMode.PACK.value else concat_dataset
        cache_dir = _cache_dir(config)
        train, train_packing = layout(train, config.seq_length, config.split_seed, "train", cache_dir)
        summary.packing.append(train_packing)
        if valid is not None:
            valid, valid_packing = layout(valid, config.seq_length, config.split_seed, "valid", cache_dir)
            summary.packing.append(valid_packing)

    for warning in summary.warnings:
        logger.warning(warning)
    return MFTDataset(
        train=train, valid=valid, tasks=tasks, summary=summary, padding_mode=config.padding_mode,
        prompt_format=prompt_format, config=config,
    )

