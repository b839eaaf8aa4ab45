"""`MFTConfig`: `transformers.TrainingArguments` plus the multi-task loss fields.

>>> args = MFTConfig(output_dir="out", weighted_loss_mode="case3", task_weights={"code_qa": 2.0})
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import TrainingArguments

from .json_settings import parse_json_text
from .modes import CoBaValidSampling, LossImplementation, LossMode


# (deprecated alias, current name) of the checkpointing settings in transformers >= 5.2x.
CHECKPOINTING_ALIASES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def checkpointing_under_current_name(settings: dict[str, Any], config_class: type) -> dict[str, Any]:
    """`settings` (the values given for a TrainingArguments subclass) with the checkpointing
    settings under their current names, so that transformers does not warn, on every run, that the
    old name is a deprecated alias: an old-name value (given, or the class's default, as TRL's True)
    moves to the new name unless that is set; the old name is left unset (transformers mirrors it).
    Unchanged for a transformers without the new names.

    >>> checkpointing_under_current_name({"gradient_checkpointing": False}, MFTConfig)["activation_checkpointing"]
    False
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    settings = dict(settings)
    for old, new in CHECKPOINTING_ALIASES:
        if old not in fields or new not in fields:
            return settings
        if settings.get(new) is None:
            default = fields[old].default
            value = settings.get(old, None if default is dataclasses.MISSING else default)
            if value is not None:
                settings[new] = value
        settings[old] = None
    return settings


@dataclass
class MFTConfig(TrainingArguments):
    """Training arguments of an MFT run. Every `TrainingArguments` field works as usual (DeepSpeed,
    FSDP, checkpoints, resume, early stopping, logging); the fields below add the per-task loss.

    Loss:
        weighted_loss_mode: how per-token losses become the loss of a step (DESIGN.md, "Loss modes"):
            `case1` (token mean), `case2` (sample mean), `case3` (task-balanced token mean, default),
            `case4` (task-balanced sample mean), `coba` (case3 with self-paced weights, see below);
            aliases `token`, `sample`, `task`, `task_sample`.
        task_weights: per-task loss weights by task name (default equal), for case3/case4 (and for
            coba until `coba_warmup_steps`).
        loss_implementation: `auto` (default), `chunked` or `plain`: whether per-token cross-entropy is
            computed from the hidden states a chunk at a time (mft_trainer/chunked_loss.py) or from the
            model's full logits.
        loss_chunk_size: positions per chunk of the chunked loss (0: automatic).

    CoBa (`weighted_loss_mode: coba`, docs/coba.md; names and defaults as in MFTCoder; needs an
    `eval_dataset` with validation samples of every task):
        coba_warmup_steps: optimizer steps with the configured weights before CoBa sets them.
        coba_history_length: validation samples in the slope-fitting window.
        coba_tau: temperature of the divergence factor.
        coba_update_interval: optimizer steps between validation samples (and weight updates).
        coba_sample_valid_num: validation batches per sample.
        coba_valid_sampling: `proportional` (MFTCoder's: draws from the whole validation set, tasks by
            their share of it) or `uniform` (every task the same number of rows in each draw).
    """

    weighted_loss_mode: str = field(
        default="case3",
        metadata={
            "help": "Loss reduction: case1 (token mean), case2 (sample mean), case3 (task-balanced token mean, "
            "the default), case4 (task-balanced sample mean), coba (case3 with weights set during training by the "
            "CoBa convergence balancer; needs an eval dataset); aliases token, sample, task, task_sample."
        },
    )
    task_weights: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Per-task loss weights by task name, e.g. {"code_qa": 2.0}; tasks not named weigh 1.0. '
            "Used by case3 and case4 (and by coba until coba_warmup_steps)."
        },
    )
    coba_warmup_steps: int = field(
        default=100,
        metadata={"help": "coba: optimizer steps trained with the configured task weights before CoBa sets them."},
    )
    coba_history_length: int = field(
        default=200,
        metadata={"help": "coba: number of validation samples (the latest) over which loss slopes are fitted."},
    )
    coba_tau: float = field(
        default=5.0,
        metadata={"help": "coba: temperature of the divergence factor; larger reacts faster to a rising loss."},
    )
    coba_update_interval: int = field(
        default=1,
        metadata={"help": "coba: optimizer steps between validation samples and weight updates."},
    )
    coba_sample_valid_num: int = field(
        default=1,
        metadata={
            "help": "coba: validation batches (of per_device_eval_batch_size per rank) measured at each sample."
        },
    )
    coba_valid_sampling: str = field(
        default="proportional",
        metadata={
            "help": "coba: how validation draws pick rows: 'proportional' (MFTCoder's: from the whole validation set, "
            "so each task appears by its share of it and a small task misses many draws) or 'uniform' (the tasks in "
            "turn: each draw holds every task the same number of rows, and a task's rows repeat only after all were "
            "drawn)."
        },
    )

    loss_implementation: str = field(
        default="auto",
        metadata={
            "help": "How per-token cross-entropy is computed: chunked (from the hidden states, a chunk of positions "
            "at a time and only where there is a target, never materialising the full logits: the same losses and "
            "gradients with far less memory), plain (the model's full logits), or auto (chunked when the model's "
            "output layer is a plain Linear whose output is the logits unchanged, which is checked on the model at "
            "the first step, and torch_compile is off; else plain)."
        },
    )
    loss_chunk_size: int = field(
        default=0,
        metadata={
            "help": "chunked loss: positions per chunk; 0 picks about 1 GiB of chunk buffers (832 positions at a "
            "152k vocabulary)."
        },
    )
    generation_eval_files: dict | str | None = field(
        default=None,
        metadata={
            "help": "Generation-based evaluation (mft_trainer/generation_eval.py): {task: jsonl of held-out records}; "
            "the model answers each record's prompt greedily, prompted as in training, and eval_gen/<task>/pass@1 "
            "(records with HumanEval test and entry_point fields, each run in its own process) or "
            "eval_gen/<task>/exact_match and /contains are logged; the answers go to output_dir/eval_gen/."
        },
    )
    generation_eval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Generation-based evaluation every this many steps (default: only at the end of training)."},
    )
    generation_eval_max_new_tokens: int = field(
        default=256, metadata={"help": "Generation-based evaluation: most tokens per answer."}
    )
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement of metric_for_best_model (default "
            "eval_loss; e.g. eval_loss/code_qa for one task), as MFTCoder's early_stopping_stall_num. Turns on "
            "load_best_model_at_end, so the best checkpoint is kept and loaded at the end."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of metric_for_best_model that counts as an improvement."}
    )

    # None = not set: MFTConfig then turns checkpointing on (MFTCoder's default). transformers >= 5.2x
    # names it activation_checkpointing and keeps this name as an alias; older ones default it to False,
    # which could not be told apart from a user's False.
    gradient_checkpointing: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory (on unless set to false, as in "
            "MFTCoder); newer transformers name it activation_checkpointing, and either name works.",
            "nargs": "?",
            "const": True,
        },
    )

    # Mappings that HfArgumentParser passes as JSON text (the fields are typed `dict | str | None` for it).
    _JSON_FIELDS = ("task_weights", "generation_eval_files")

    def __post_init__(self) -> None:
        for name in self._JSON_FIELDS:
            setattr(self, name, parse_json_text(name, getattr(self, name)))
        self._default_checkpointing_on()
        if self.early_stopping_patience is not None:
            # Before TrainingArguments' own checks, which derive greater_is_better from the metric.
            if not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 1:
                raise ValueError(f"early_stopping_patience must be an integer >= 1, got {self.early_stopping_patience!r}")
            if str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
                raise ValueError(
                    "early_stopping_patience needs evaluation: set eval_strategy: steps with eval_steps (and "
                    "save_steps a multiple of eval_steps), or eval_strategy: epoch"
                )
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "eval_loss"
        super().__post_init__()
        self.loss_implementation = LossImplementation.parse(self.loss_implementation).value
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be an integer >= 0 (0 = automatic), got {self.loss_chunk_size!r}")
        mode = LossMode.parse(self.weighted_loss_mode)
        self.weighted_loss_mode = mode.value
        if self.generation_eval_files is not None and not isinstance(self.generation_eval_files, dict):
            raise ValueError(
                "generation_eval_files must be a mapping task -> jsonl path, e.g. {code_completion: "
                f"data/humaneval_valid.jsonl}}, got {self.generation_eval_files!r}"
            )
        if self.generation_eval_steps is not None and self.generation_eval_steps < 1:
            raise ValueError(f"generation_eval_steps must be >= 1, got {self.generation_eval_steps!r}")
        self._check_coba_settings()
        self.coba_valid_sampling = CoBaValidSampling.parse(self.coba_valid_sampling).value
        if self.task_weights is not None:
            if not isinstance(self.task_weights, dict):
                raise ValueError(f'task_weights must be a mapping task name -> weight, e.g. {{"code_qa": 2.0}}, got {self.task_weights!r}')
            for name, weight in self.task_weights.items():
                if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"task_weights[{name!r}] must be a finite number >= 0, got {weight!r}")
            if mode in (LossMode.CASE1, LossMode.CASE2):
                raise ValueError(
                    f"task_weights are used by the task-balanced modes (case3, case4, coba) only; weighted_loss_mode is "
                    f"{mode.value}"
                )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                "label_smoothing_factor is not supported: MFTTrainer computes its own per-task cross-entropy"
            )

    def _check_coba_settings(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.coba_warmup_steps) or self.coba_warmup_steps < 0:
            raise ValueError(f"coba_warmup_steps must be an integer >= 0 (optimizer steps), got {self.coba_warmup_steps!r}")
        if not is_int(self.coba_history_length) or self.coba_history_length < 2:
            raise ValueError(
                f"coba_history_length must be an integer >= 2 (a slope needs two points), got {self.coba_history_length!r}"
            )
        tau = self.coba_tau
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"coba_tau must be a finite number > 0, got {tau!r}")
        if not is_int(self.coba_update_interval) or self.coba_update_interval < 1:
            raise ValueError(
                f"coba_update_interval must be an integer >= 1 (optimizer steps), got {self.coba_update_interval!r}"
            )
        if not is_int(self.coba_sample_valid_num) or self.coba_sample_valid_num < 1:
            raise ValueError(f"coba_sample_valid_num must be an integer >= 1 (batches), got {self.coba_sample_valid_num!r}")

    def _default_checkpointing_on(self) -> None:
        """Gradient checkpointing on when neither name is set; non-reentrant unless kwargs are given
        (the reentrant variant needs inputs that require grad, which a frozen LoRA base lacks)."""
        # The name this transformers reads first, then its alias (if it has one).
        names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if n in self.__dataclass_fields__]
        # MFTCoder's (and older transformers') name is accepted as it is, without transformers' warning.
        settings = {name: getattr(self, name) for pair in CHECKPOINTING_ALIASES for name in pair if hasattr(self, name)}
        for name, value in checkpointing_under_current_name(settings, type(self)).items():
            setattr(self, name, value)
        if all(getattr(self, name) is None for name in names):
            setattr(self, names[0], True)
        enabled = any(getattr(self, name) for name in names)
        if enabled and all(getattr(self, f"{name}_kwargs") is None for name in names):
            setattr(self, f"{names[0]}_kwargs", {"use_reentrant": False})
