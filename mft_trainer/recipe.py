"""Recipes: one YAML (or MFTCoder JSON) file plus `--key value` overrides -> the run's three configs.

    python scripts/train.py recipe.yaml --learning_rate 1e-4 --max_steps 200

A recipe holds `ModelConfig`, `DataConfig` and `MFTConfig` (TrainingArguments) fields side by side.
Values are coerced to each field's type, so YAML's `lr: 2e-5` (a string for YAML 1.1) is a float;
a value that cannot be coerced (a list for a number, say) and an unknown key are errors that name
the key and what is expected. A key written twice and a file that is not valid YAML (or JSON) are
errors that give the file and line.
An MFTCoder JSON train config is translated to these fields, and the mapping is printed.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from .config import MFTConfig, checkpointing_under_current_name
from .data_config import DataConfig
from .model_config import ModelConfig
from .modeling import check_model_paths

CONFIG_CLASSES: tuple[type, ...] = (ModelConfig, DataConfig, MFTConfig)


class RecipeError(ValueError):
    """A recipe key or value that cannot be used; the message says which and how to fix it."""


@dataclass
class Recipe:
    """The parsed configs of a run, and what the parser has to report. `stage` is `sft` (multi-task
    fine-tuning: DataConfig and MFTConfig) or a preference stage, `dpo` / `orpo` (PreferenceDataConfig
    and TRL's DPOConfig / ORPOConfig; mft_trainer/preference.py)."""

    model: ModelConfig
    data: Any
    training: Any
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. the MFTCoder key mapping
    stage: str = "sft"


STAGES = ("sft", "dpo", "orpo")


def config_classes(stage: str = "sft") -> tuple[type, type, type]:
    """(model, data, training) config classes of a stage; the preference stages need TRL."""
    if stage == "sft":
        return CONFIG_CLASSES
    if stage not in STAGES:
        raise RecipeError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    from .preference import PreferenceDataConfig

    try:
        if stage == "dpo":
            from trl import DPOConfig as training
        else:
            from trl.experimental.orpo import ORPOConfig as training
    except ImportError:
        raise RecipeError(f"stage {stage} needs TRL: pip install 'trl>=1.16'") from None
    return ModelConfig, PreferenceDataConfig, training


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _owner_of_keys(classes: Sequence[type] = CONFIG_CLASSES) -> dict[str, type]:
    owner: dict[str, type] = {}
    for cls in classes:
        for name in _fields(cls):
            owner.setdefault(name, cls)
    return owner


# TrainingArguments fields annotated `str` that take true/false too: `fsdp: true` turns FSDP on
# (configured by fsdp_config). YAML gives a bool; on the command line `--fsdp true` (or a bare
# `--fsdp`) must mean the same, not the option string "true".
SWITCHES_TYPED_AS_STRINGS = ("fsdp",)


def _type_options(annotation: Any) -> list[Any]:
    """The alternatives of a field annotation: `int | None` -> [int, NoneType]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return list(typing.get_args(annotation))
    return [annotation]


def _convert(value: Any, target: type) -> Any:
    """Convert a scalar to bool, int or float; raise ValueError when it does not fit."""
    if target is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError
    if isinstance(value, bool):
        raise ValueError  # true/false is no number
    if target is int:
        number = float(value) if isinstance(value, str) and not value.strip().lstrip("+-").isdigit() else value
        if float(number) != int(float(number)):
            raise ValueError
        return int(float(number))
    return float(value)


def _takes_only_scalars(options: list[Any]) -> bool:
    """True when no alternative of a field's type holds a list or a mapping (`int`, `str | None`, an
    enum), so that a list or mapping written for it is a mistake to report, not a value to pass on."""
    for option in options:
        if option is Any or typing.get_origin(option) not in (None, typing.Literal):
            return False  # Any, list[str], dict[str, Any], ...
        if isinstance(option, type) and not issubclass(option, (bool, int, float, str, enum.Enum)):
            return False  # list, dict, or a class of its own
    return True


def coerce_value(key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` to the field's scalar type (bool, int, float) when it is written otherwise,
    e.g. YAML's string "2e-5" for a float. Other values are passed as written: the config classes
    validate them (TrainingArguments converts its own enums and JSON strings).

    Raises:
        RecipeError: a value that fits none of the field's scalar types, or a list or mapping for a
            field that takes a single value (`max_steps: [3]`).
    """
    options = [t for t in _type_options(annotation) if t is not type(None)]
    if key in SWITCHES_TYPED_AS_STRINGS:
        options.append(bool)
    if isinstance(value, (list, tuple, dict)) and options and _takes_only_scalars(options):
        kind = "mapping" if isinstance(value, dict) else "list"
        expected = " or ".join(getattr(t, "__name__", str(t)) for t in options)
        raise RecipeError(f"{key}: {value!r} is a {kind}, but {key} takes a single {expected}")
    scalars = [t for t in (bool, int, float) if t in options]
    if value is None or not scalars or not isinstance(value, (str, int, float)):
        return value
    for target in scalars:
        try:
            return _convert(value, target)
        except (TypeError, ValueError):
            continue
    if str in options:
        return value
    expected = " or ".join(t.__name__ for t in scalars)
    raise RecipeError(f"{key}: {value!r} is not a valid {expected}")


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """`--key value` (or `--key=value`, or a bare `--flag` for true) pairs into a dict of raw strings."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise RecipeError(f"unexpected argument {arg!r}: overrides are written --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            overrides[key] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides[key] = argv[i + 1]
            i += 1
        else:
            overrides[key] = "true"
        i += 1
    return overrides


def _parse_override_value(key: str, value: Any) -> Any:
    """Lists and mappings on the command line are written in YAML/JSON flow style: [a, b], {a: 1}."""
    if isinstance(value, str) and value.strip()[:1] in "[{":
        try:
            return yaml.load(value, Loader=_RecipeLoader)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise RecipeError(f"--{key} {value}: not a valid YAML list or mapping: {problem}") from None
    return value


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one YAML mapping."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (YAML itself
    keeps the last value, so the first would be dropped without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}  # key -> the line it was first written on (0-based)
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges keys that the mapping may then override
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_lines
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if seen:
                raise _DuplicateKeyError(
                    None, None,
                    f"duplicate key {key!r} (first written at line {first_lines[key] + 1}); write each key once",
                    key_node.start_mark,
                )
            first_lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` object hook: a key written twice in one object is an error, as in YAML recipes."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise RecipeError(f"duplicate key {key!r}; write each key once")
        values[key] = value
    return values


def _parse_recipe_text(path: Path, text: str) -> Any:
    """The recipe file's content; syntax errors and duplicate keys give the file, line and column."""
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_json_keys)
        return yaml.load(text, Loader=_RecipeLoader)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        if isinstance(e, _DuplicateKeyError):
            raise RecipeError(f"{where}: {problem}") from None
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None:
            context += f" that starts at line {context_mark.line + 1}"  # often where the mistake is
        raise RecipeError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None


def load_recipe_file(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML recipe, or an MFTCoder JSON config (translated); return (values, notes).

    Raises:
        RecipeError: a missing file, a syntax error or a key written twice (with file and line), or
            content that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    values = _parse_recipe_text(path, path.read_text(encoding="utf-8"))
    if values is None and path.suffix != ".json":
        values = {}  # an empty YAML file: everything comes from the command line
    if not isinstance(values, Mapping):
        raise RecipeError(f"{path}: a recipe is a mapping of key: value, got {type(values).__name__}")
    if path.suffix == ".json":
        from .mftcoder import is_mftcoder_config, translate_mftcoder_config

        if is_mftcoder_config(values):
            return translate_mftcoder_config(values)
    return dict(values), []


def build_recipe(values: Mapping[str, Any], notes: Sequence[str] = (), stage: str = "sft") -> Recipe:
    """Split recipe values among the configs of `stage`, coerce them, and build the configs.

    Raises:
        RecipeError: unknown keys (with close matches) or values of the wrong type.
    """
    classes = config_classes(stage)
    owner = _owner_of_keys(classes)
    unknown = [key for key in values if key not in owner]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, owner, n=3)
            hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise RecipeError(f"unknown recipe key(s): {', '.join(hints)}; `--help` lists every key")
    per_class: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for key, value in values.items():
        cls = owner[key]
        annotation = typing.get_type_hints(cls).get(key, Any)
        per_class[cls][key] = coerce_value(key, value, annotation)
    try:
        model, data, training = (cls(**per_class[cls]) for cls in classes)
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e)) from e
    return Recipe(model=model, data=data, training=training, notes=list(notes), stage=stage)


def parse_recipe(argv: Sequence[str]) -> Recipe:
    """Parse `[recipe file] [--key value ...]`: the file first, then the overrides on top."""
    argv = list(argv)
    values: dict[str, Any] = {}
    notes: list[str] = []
    if argv and not argv[0].startswith("--"):
        values, notes = load_recipe_file(argv.pop(0))
    for key, value in parse_overrides(argv).items():
        values[key] = _parse_override_value(key, value)
    stage = str(values.pop("stage", "sft")).lower()
    if stage != "sft" and "bf16" not in values and "fp16" not in values:
        # TRL's configs turn bf16 on when neither is set, which stops a run on a machine without a
        # bf16 GPU ("Your setup doesn't support bf16/gpu"); MFT's default, full precision, works everywhere.
        values["bf16"] = _bf16_gpu()
    if stage != "sft":
        # TRL's configs default gradient_checkpointing to True: under transformers' current name.
        values = checkpointing_under_current_name(values, config_classes(stage)[2])
    return build_recipe(values, notes, stage)


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_recipe_paths(recipe: Recipe) -> None:
    """Check, before anything loads, that the recipe's local paths exist: the model and tokenizer
    (a path that looks local is never tried as a hub id, mft_trainer/paths.py), every task source
    (a data file, a directory holding some, or a `datasets` spec whose local path exists), and the
    generation-eval files.

    Raises:
        RecipeError: the first path that does not exist or holds no data, named.
    """
    try:
        check_model_paths(recipe.model)
        if recipe.stage == "sft":
            recipe.data.check_paths()
        else:
            recipe.data.files()
        for task, path in (getattr(recipe.training, "generation_eval_files", None) or {}).items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"generation_eval_files[{task!r}]: {path!r} does not exist")
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(str(e)) from None


def _type_name(annotation: Any) -> str:
    """`int`, `str | None`, `Optional[str]`: an annotation as written."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def help_text() -> str:
    """Every recipe key with its type, default and help: the keys mft-trainer adds first (data, model,
    multi-task loss), then those MFTConfig inherits from TrainingArguments.

    >>> print(help_text().splitlines()[2])
    DataConfig: data
    """
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    mft_keys = [name for name in _fields(MFTConfig) if name not in inherited]
    training_keys = [name for name in _fields(MFTConfig) if name in inherited]
    groups = [
        (DataConfig, "data", list(_fields(DataConfig))),
        (ModelConfig, "model", list(_fields(ModelConfig))),
        (MFTConfig, "multi-task loss, CoBa, generation-based evaluation, early stopping", mft_keys),
        (MFTConfig, "TrainingArguments (transformers)", training_keys),
    ]
    lines = ["Recipe keys (YAML file and/or --key value overrides):"]
    for cls, title, names in groups:
        lines.append(f"\n{cls.__name__}: {title}")
        hints = typing.get_type_hints(cls)
        fields = _fields(cls)
        for name in names:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else (
                "(computed)" if f.default_factory is dataclasses.MISSING else f.default_factory()
            )
            help_ = f.metadata.get("help", "")
            lines.append(f"  --{name} ({_type_name(hints.get(name))}, default {default!r})\n      {help_}")
    return "\n".join(lines)
