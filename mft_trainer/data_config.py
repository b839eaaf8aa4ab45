"""`DataConfig`: what data to read and how to turn it into training samples.

>>> config = DataConfig(data_paths=["examples/data/code_qa", "examples/data/multi_round_chat"],
...                     seq_length=1024, data_split="98,2")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .formats import InputFormat
from .json_settings import parse_json_text
from .modes import EmptyAnswers, OverlengthPolicy, PaddingMode
from .mixture import SamplingKind, SamplingRule, parse_max_samples
from .prompt_format import check_chat_template_setting
from .rendering import RoleMarkers
from .splitting import parse_data_split
from .tasks import resolve_task_sources


@dataclass
class DataConfig:
    """Data fields of a run. Each field's `help` is what `--help` shows.

    Groups:
        where: data_paths, valid_data_paths
        records: record_format, empty_answers, skip_invalid_records
        samples: seq_length, overlength_policy, chat_template, role_markers, eos_token
        mixture: task_sampling, max_samples
        batches: padding_mode
        split: data_split, split_seed
        processing: tokenize_num_proc, dataset_cache_dir
    """

    data_paths: list[str] | str | dict | None = field(
        default=None,
        metadata={
            "help": "The tasks: a task directory (searched recursively for .jsonl, .json, .parquet, .csv and .arrow "
            "files, in any case, and save_to_disk directories), one such file, or a datasets spec {path: org/name or a "
            "local directory, name, split, data_files, revision}; a list of them (the task name is the directory's "
            "name, the file's without extension, or the spec path's last part), or a mapping {task_name: [sources]}. "
            "See docs/data_format.md."
        },
    )
    valid_data_paths: list[str] | str | dict | None = field(
        default=None,
        metadata={
            "help": "Explicit validation data, in the same form as data_paths and with the same task names. When "
            "given, all of data_paths is used for training and data_split must not ask for a validation part."
        },
    )
    data_split: Optional[str] = field(
        default=None,
        metadata={
            "help": 'Train/validation weights per task, "98,2" (MFTCoder\'s "98,2,0" is accepted; the test part '
            'must be 0). Default "98,2", or "100,0" when valid_data_paths is given.'
        },
    )
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the per-task train/validation split and of the packing order."}
    )
    seq_length: int = field(default=2048, metadata={"help": "Maximum tokens per sample (and per packed row)."})
    overlength_policy: str = field(
        default="drop",
        metadata={
            "help": "Samples longer than seq_length: 'drop' them or 'truncate' them to seq_length (a truncated "
            "sample with no trained token left is dropped). Both are counted per task in the summary. Not used "
            "by padding_mode 'concat', which splits long documents across rows."
        },
    )
    task_sampling: dict | str | None = field(
        default="proportional",
        metadata={
            "help": "The task mixture of each training epoch, of as many samples as the tasks have: 'proportional' "
            "(every sample once), 'uniform' (every task the same number), {temperature: T} (task i's share "
            "proportional to n_i^(1/T)), or {weights: {task_name: weight}} (tasks not named weigh 1). Tasks are up- or "
            "down-sampled by a seeded plan (split_seed) made before packing; an up-sampled task repeats a sample only "
            "after all were used. Validation data is not resampled. See docs/data_format.md."
        },
    )
    max_samples: int | str | dict | None = field(
        default=None,
        metadata={
            "help": "Use at most this many records of each task (an integer for all tasks, or {task_name: n}): a "
            "subset of its valid records chosen with split_seed, before tokenization and the split. Not applied to "
            "valid_data_paths."
        },
    )
    padding_mode: str = field(
        default="padding",
        metadata={
            "help": "How samples become batches: 'padding' (one sample per row, padded to the longest of the batch), "
            "'pack' (whole samples packed best-fit-decreasing into rows of seq_length when the dataset is built), "
            "'padding_free' (each batch flattened into one row by the collator), 'concat' (continued pre-training: "
            "the token stream cut into full rows of seq_length, documents may span rows). The packed modes give "
            "position_ids restarting at every sample and no attention_mask; see docs/packing.md."
        },
    )
    chat_template: str = field(
        default="mftcoder",
        metadata={
            "help": "How conversations are written, in training and at inference: 'mftcoder' (MFTCoder's "
            "<s>human/<s>bot markers, token for token; the saved tokenizer gets a template that reproduces them), "
            "'model' (the tokenizer's own chat template, e.g. ChatML or Llama-3 headers, kept as it is on the saved "
            "tokenizer), or the path of a .jinja template file (installed on the saved tokenizer). In the template "
            "modes each assistant turn's content and end-of-turn marker are trained, nothing else; see "
            "docs/data_format.md."
        },
    )
    role_markers: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Turn markers of chat_template mftcoder {"system": ..., "user": ..., "assistant": ...}; default MFTCoder\'s '
            '"<s>system\\n", "<s>human\\n", "<s>bot\\n".'
        },
    )
    eos_token: Optional[str] = field(
        default=None,
        metadata={
            "help": "Token that ends every assistant turn of chat_template mftcoder, and every text record; default "
            "the tokenizer's EOS token. In the template modes, assistant turns end with what the template writes."
        },
    )
    record_format: dict | str | None = field(
        default="auto",
        metadata={
            "help": "The format of the records: 'auto' (detected per record from its keys), or one of chat_rounds, "
            "messages, sharegpt, prompt_completion, alpaca, single_turn, text for every task, or a mapping "
            "{task_name: format} (tasks not named: auto). See docs/data_format.md."
        },
    )
    empty_answers: str = field(
        default="train",
        metadata={
            "help": "Assistant turns with no content: 'train' them as an empty answer, as MFTCoder does (its "
            "\"\\n\" + EOS in the mftcoder format, the template's end of turn in the template modes), counted per task "
            "in the summary with a warning; or 'invalid' (the record is invalid, see skip_invalid_records)."
        },
    )
    skip_invalid_records: bool = field(
        default=False,
        metadata={
            "help": "Skip invalid records (counted per task and reason in the summary) instead of stopping "
            "with the list of errors."
        },
    )
    tokenize_num_proc: Optional[int] = field(
        default=None,
        metadata={"help": "Processes that validate and tokenize the records (datasets.map num_proc); default 1."},
    )
    dataset_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Where read, validated and tokenized tasks are cached (reused while data, tokenizer and settings "
            "are unchanged); default <HF datasets cache>/mft_trainer. Set to 'none' to disable caching (everything "
            "is then held in memory)."
        },
    )

    # Lists and mappings that HfArgumentParser passes as JSON text (their fields are typed `X | str | None`
    # for it: mft_trainer/json_settings.py).
    _JSON_FIELDS = ("data_paths", "valid_data_paths", "task_sampling", "max_samples", "role_markers", "record_format")

    def __post_init__(self) -> None:
        for name in self._JSON_FIELDS:
            setattr(self, name, parse_json_text(name, getattr(self, name)))
        if isinstance(self.max_samples, str) and self.max_samples.strip().isdigit():
            self.max_samples = int(self.max_samples)  # one count for every task, as a command line gives it
        # None (which the command-line typing allows) is the default.
        if self.task_sampling is None:
            self.task_sampling = SamplingKind.PROPORTIONAL.value
        if self.record_format is None:
            self.record_format = InputFormat.AUTO.value
        if self.data_paths is None or self.data_paths == [] or self.data_paths == {}:
            raise ValueError(
                "data_paths is required: a task directory, a list of them, or a mapping {task_name: [paths]}, "
                "e.g. data_paths: [data/code_qa, data/chat]"
            )
        if not isinstance(self.seq_length, int) or self.seq_length <= 0:
            raise ValueError(f"seq_length must be a positive integer, got {self.seq_length!r}")
        self.overlength_policy = OverlengthPolicy.parse(self.overlength_policy).value
        if self.data_split is None:
            self.data_split = "100,0" if self.valid_data_paths is not None else "98,2"
        _, valid_fraction = parse_data_split(self.data_split)
        if self.valid_data_paths is not None and valid_fraction > 0:
            raise ValueError(
                f"valid_data_paths is given and data_split {self.data_split!r} also asks for a validation part; "
                'use one of them (with valid_data_paths, leave data_split unset or "100,0")'
            )
        RoleMarkers.from_config(self.role_markers)  # validate early, with the same message as later
        check_chat_template_setting(self.chat_template, self.role_markers)
        self.padding_mode = PaddingMode.parse(self.padding_mode).value
        self.empty_answers = EmptyAnswers.parse(self.empty_answers).value
        self._check_record_format()
        SamplingRule.parse(self.task_sampling)  # validate early, with the same message as later
        self.max_samples = parse_max_samples(self.max_samples)
        if self.tokenize_num_proc is not None and self.tokenize_num_proc < 1:
            raise ValueError(f"tokenize_num_proc must be >= 1, got {self.tokenize_num_proc!r}")

    def _check_record_format(self) -> None:
        if isinstance(self.record_format, dict):
            if not self.record_format:
                raise ValueError("record_format is an empty mapping; give {task_name: format} or one format for all")
            for name, value in self.record_format.items():
                InputFormat.parse(value, where=f"record_format[{name!r}]")
        elif isinstance(self.record_format, (str, InputFormat)):
            self.record_format = InputFormat.parse(self.record_format).value
        else:
            raise ValueError(
                f"record_format must be a format name or a mapping {{task_name: format}}, got {self.record_format!r}"
            )

    def record_format_of(self, task: str) -> InputFormat:
        """The record format of task `task` (`auto` unless record_format names one)."""
        if isinstance(self.record_format, dict):
            return InputFormat.parse(self.record_format.get(task, InputFormat.AUTO.value))
        return InputFormat.parse(self.record_format)

    def check_task_names(self, names: list[str]) -> None:
        """Settings by task name must name tasks that exist.

        Raises:
            ValueError: record_format, max_samples or task_sampling weights name a task that data_paths
                does not have.
        """
        for setting, value in (("record_format", self.record_format), ("max_samples", self.max_samples)):
            unknown = sorted(set(value) - set(names)) if isinstance(value, dict) else []
            if unknown:
                raise ValueError(f"{setting} names unknown task(s) {unknown}; the tasks are {names}")
        self.sampling_rule.check_tasks(names)

    @property
    def sampling_rule(self) -> SamplingRule:
        """`task_sampling`, parsed."""
        return SamplingRule.parse(self.task_sampling)

    def check_paths(self) -> None:
        """Check that every task path exists and holds data, as `build_mft_dataset` will need, so that
        a mistyped path fails before anything loads.

        Raises:
            FileNotFoundError: a path that does not exist (a local `datasets` path too: never a hub request).
            ValueError: a directory without data files, a file that is not one, a malformed `datasets` spec,
                two tasks of one name.
        """
        resolve_task_sources(self.data_paths)
        if self.valid_data_paths is not None:
            resolve_task_sources(self.valid_data_paths)

    @property
    def valid_fraction(self) -> float:
        return parse_data_split(self.data_split)[1]

    @property
    def splits_long_samples(self) -> bool:
        """True when samples longer than seq_length are kept whole and cut across rows (concat)."""
        return self.padding_mode == PaddingMode.CONCAT.value

    def render_settings(self) -> dict[str, Any]:
        """The fields that change how a record becomes tokens (part of the tokenization cache key)."""
        return {
            "seq_length": self.seq_length,
            "overlength_policy": self.overlength_policy,
            "splits_long_samples": self.splits_long_samples,
            "chat_template": self.chat_template,
            "role_markers": RoleMarkers.from_config(self.role_markers).to_dict(),
            "eos_token": self.eos_token,
        }
