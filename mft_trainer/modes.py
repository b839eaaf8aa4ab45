"""The modes: settings whose value picks one of a few behaviours, each an enum with one parser.

Configs keep these settings as their plain string values (YAML, `--help` and saved run configs show
strings), parsed once where the config is built; the code that acts on a setting compares members,
never spelled-out strings.

>>> LossMode.parse("task")                   # MFTCoder's names, readable aliases, any case
<LossMode.CASE3: 'case3'>
>>> PaddingMode.parse("pack").is_packed
True
>>> PaddingMode.parse("packed")
Traceback (most recent call last):
...
ValueError: padding_mode must be one of padding, pack, padding_free, concat, got 'packed' (see docs/packing.md)
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

Mode = TypeVar("Mode", bound="SettingEnum")


class SettingEnum(str, Enum):
    """The accepted values of one setting. Subclasses name the setting (`_setting`), and may add
    aliases (`_aliases`) and a pointer to the docs (`_see`) for the error message."""

    @classmethod
    def _setting(cls) -> str:
        raise NotImplementedError

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {}

    @classmethod
    def _see(cls) -> str:
        return ""

    @classmethod
    def parse(cls: type[Mode], value: str | Mode) -> Mode:
        """The member named `value` (or an alias), any case and surrounding blanks.

        Raises:
            ValueError: `value` is not accepted; the message names the setting and lists what is.
        """
        if isinstance(value, cls):
            return value
        key = str(value).strip().lower()
        key = cls._aliases().get(key, key)
        try:
            return cls(key)
        except ValueError:
            accepted = ", ".join(member.value for member in cls)
            aliases = cls._aliases()
            if aliases:
                accepted += f" (aliases: {', '.join(aliases)})"
            see = f" (see {cls._see()})" if cls._see() else ""
            raise ValueError(f"{cls._setting()} must be one of {accepted}, got {value!r}{see}") from None


class LossMode(SettingEnum):
    """How per-token losses are reduced to the loss of one optimizer step (`weighted_loss_mode`)."""

    CASE1 = "case1"  # token mean
    CASE2 = "case2"  # sample mean (mean of per-sample token means)
    CASE3 = "case3"  # task-balanced token mean (default)
    CASE4 = "case4"  # task-balanced sample mean
    COBA = "coba"  # case3 with weights supplied by the Convergence Balancer

    @classmethod
    def _setting(cls) -> str:
        return "weighted_loss_mode"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"token": "case1", "sample": "case2", "task": "case3", "task_sample": "case4"}

    @classmethod
    def _see(cls) -> str:
        return "docs/loss_modes.md"


class LossImplementation(SettingEnum):
    """How per-token cross-entropy is computed (`loss_implementation`, docs/chunked_loss.md)."""

    AUTO = "auto"  # chunked where the model allows it, else plain
    CHUNKED = "chunked"  # from the hidden states, a chunk of positions at a time (no full logits)
    PLAIN = "plain"  # from the model's full logits

    @classmethod
    def _setting(cls) -> str:
        return "loss_implementation"


class CoBaValidSampling(SettingEnum):
    """How CoBa's validation draws pick rows (`coba_valid_sampling`)."""

    PROPORTIONAL = "proportional"  # a walk through the whole set: tasks by their share of it (MFTCoder's)
    UNIFORM = "uniform"  # the tasks in turn: every task the same number of rows in each draw (±1)

    @classmethod
    def _setting(cls) -> str:
        return "coba_valid_sampling"


class PaddingMode(SettingEnum):
    """How samples become the rows of a batch (`padding_mode`, docs/packing.md).

    The packed modes (all but `padding`) put several samples in one row. Their batches carry
    per-token `position_ids` that restart at 0 for every sample and no `attention_mask`, so the
    attention backend keeps samples apart (DESIGN.md invariant 3).
    """

    PADDING = "padding"  # one sample per row, padded to the longest of the batch (attention_mask)
    PACK = "pack"  # whole samples packed best-fit-decreasing into rows of <= seq_length, at build time
    PADDING_FREE = "padding_free"  # the collator flattens each batch of samples into one row
    CONCAT = "concat"  # continued pre-training: the token stream cut into full rows; documents may span rows

    @property
    def is_packed(self) -> bool:
        """True when a row may hold several samples (position_ids, no attention_mask)."""
        return self is not PaddingMode.PADDING

    @classmethod
    def _setting(cls) -> str:
        return "padding_mode"

    @classmethod
    def _see(cls) -> str:
        return "docs/packing.md"


class OverlengthPolicy(SettingEnum):
    """What happens to a sample longer than `seq_length` (`overlength_policy`)."""

    DROP = "drop"  # the sample is left out (and counted)
    TRUNCATE = "truncate"  # the sample is cut to seq_length; dropped (and counted) if no trained token is left

    @classmethod
    def _setting(cls) -> str:
        return "overlength_policy"


class EmptyAnswers(SettingEnum):
    """What happens to an assistant turn with no content (`empty_answers`)."""

    TRAIN = "train"  # trained as an empty answer (MFTCoder: "\n" + EOS), counted and warned about
    INVALID = "invalid"  # the record is invalid (an error, or skipped with skip_invalid_records)

    @classmethod
    def _setting(cls) -> str:
        return "empty_answers"


class PeftType(SettingEnum):
    """What trains (`peft_type`): the whole model, or LoRA adapters over a frozen base."""

    NONE = "none"  # full fine-tuning
    LORA = "lora"
    QLORA = "qlora"  # LoRA over a 4-bit (NF4) or 8-bit quantized base

    @classmethod
    def _setting(cls) -> str:
        return "peft_type"
