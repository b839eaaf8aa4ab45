"""Checkpoints: which ones are complete enough to resume from, and what a failed save says.

The Trainer writes a checkpoint in order: the model (with the tokenizer and `tasks.json`), then the
optimizer, scheduler and RNG states, and `trainer_state.json` last. A run stopped while saving (a
full disk, a killed job) leaves a directory that looks like a checkpoint but is not one: resuming
from it fails half-way, or, without `optimizer.pt`, silently restarts the optimizer and the
learning-rate schedule. So a checkpoint is resumed from only when it is complete:

>>> checkpoint_problems("output/run/checkpoint-4")                                # doctest: +SKIP
['trainer_state.json is missing (the Trainer writes it last: the save did not finish)',
 'optimizer.pt is truncated (a torch.save file without its end)']
>>> last_complete_checkpoint("output/run")   # warns about checkpoint-4, skips it  # doctest: +SKIP
'output/run/checkpoint-2'

The checks read only what a complete file must have (a torch.save zip's central directory at its
end, a safetensors header and size, JSON that parses), so they cost little even on large files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
# Model weights as the Trainer saves them: full model, sharded, LoRA adapter.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
# DeepSpeed keeps model and optimizer states in the directory that its `latest` file names.
DEEPSPEED_LATEST_FILE = "latest"
# FSDP's own checkpoint: pytorch_model_fsdp.bin, or the directories pytorch_model_fsdp_0/, optimizer_0/.
FSDP_WEIGHTS_PREFIX = "pytorch_model_fsdp"
FSDP_OPTIMIZER_PREFIX = "optimizer_"
# Free space below which a failed save is reported as a full disk.
_FULL_DISK_BYTES = 64 * 2**20

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class IncompleteCheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message lists what is missing or damaged."""


class CheckpointSaveError(OSError):
    """Saving a checkpoint (or the model) failed; the message names the path and the cause."""


def _torch_file_problem(path: Path) -> str | None:
    """A torch.save file is a zip archive whose directory is written last: without it, it was cut short."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return None  # not the zip format (torch's legacy format, or another kind of file): not judged
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return "is truncated (a torch.save file without its end)"


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the bytes it lists."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return "is truncated (no safetensors header)"
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            return "is truncated (its safetensors header is cut short)"
        try:
            header = json.loads(f.read(header_length))
            data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "is damaged (its safetensors header is not valid)"
    expected = 8 + header_length + data_end
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "is not valid JSON (truncated?)"
    return None


def file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with one checkpoint file (None: nothing this check can see)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix in (".pt", ".pth", ".bin"):
        return _torch_file_problem(path)
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix == ".json":
        return _json_problem(path)
    return None


def _deepspeed_state_dir(checkpoint: Path) -> Path | None:
    """The directory DeepSpeed's `latest` file names (global_stepN), if the checkpoint is DeepSpeed's."""
    latest = checkpoint / DEEPSPEED_LATEST_FILE
    if not latest.is_file():
        return None
    return checkpoint / latest.read_text(encoding="utf-8").strip()


def _missing_shards(index: Path) -> list[str]:
    """The weight files a sharded checkpoint's index lists that are not there."""
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return []  # the index itself is reported as damaged
    return sorted(shard for shard in shards if not (index.parent / shard).is_file())


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """What keeps `checkpoint` from being resumed from exactly; an empty list when it is complete.

    Complete means: `trainer_state.json`, model weights, the optimizer state and (but for DeepSpeed,
    which may keep it in its own state) `scheduler.pt` are there, and no file is truncated.
    """
    path = Path(checkpoint)
    if not path.exists():
        return [f"{path} does not exist"]
    if not path.is_dir():
        return [f"{path} is not a directory (a checkpoint is a checkpoint-N directory)"]
    problems = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        problem = file_problem(file)
        if problem:
            problems.append(f"{file.relative_to(path)} {problem}")
    names = {p.name for p in path.iterdir()}
    if TRAINER_STATE_FILE not in names:
        problems.append(f"{TRAINER_STATE_FILE} is missing (the Trainer writes it last: the save did not finish)")
    deepspeed_dir = _deepspeed_state_dir(path)
    if deepspeed_dir is not None and not deepspeed_dir.is_dir():
        problems.append(f"{DEEPSPEED_LATEST_FILE} names {deepspeed_dir.name}, which is missing")
        deepspeed_dir = None
    deepspeed_files = [p.name for p in deepspeed_dir.iterdir()] if deepspeed_dir is not None else []
    has_weights = (
        bool(names & set(WEIGHT_FILES))
        or any(name.startswith(FSDP_WEIGHTS_PREFIX) for name in names)
        or any(name.endswith("model_states.pt") for name in deepspeed_files)
    )
    if not has_weights:
        problems.append(f"the model weights are missing (one of {', '.join(WEIGHT_FILES[::2])}, ...)")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            problems += [f"{shard} is missing (listed in {index})" for shard in _missing_shards(path / index)]
    has_optimizer = (
        bool(names & set(OPTIMIZER_FILES))
        or any(name.startswith(FSDP_OPTIMIZER_PREFIX) and (path / name).is_dir() for name in names)
        or any(name.endswith("optim_states.pt") for name in deepspeed_files)
    )
    if not has_optimizer:
        problems.append(
            "the optimizer state (optimizer.pt) is missing: resuming would restart the optimizer and the "
            "learning-rate schedule (a checkpoint saved with save_only_model cannot be resumed from; start a "
            "new run from its weights with model_name_or_path instead)"
        )
    if SCHEDULER_FILE not in names and deepspeed_dir is None:
        problems.append(f"{SCHEDULER_FILE} is missing: resuming would restart the learning-rate schedule")
    return problems


def check_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raise `IncompleteCheckpointError` unless `checkpoint` is complete (`checkpoint_problems`)."""
    problems = checkpoint_problems(checkpoint)
    if problems:
        raise IncompleteCheckpointError(
            f"cannot resume from {checkpoint}: " + "; ".join(problems) + ". Resume from an earlier complete "
            "checkpoint (resume_from_checkpoint: auto picks the last one), or start afresh"
        )


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-N directories of `output_dir`, highest N first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The last complete checkpoint in `output_dir` (None when there is none); each newer, incomplete
    one is skipped with a warning that names it and what it lacks."""
    for checkpoint in checkpoints_newest_first(output_dir):
        problems = checkpoint_problems(checkpoint)
        if not problems:
            return str(checkpoint)
        logger.warning("skipping the incomplete checkpoint %s: %s", checkpoint, "; ".join(problems))
    return None


def checkpoint_to_resume(requested: str | os.PathLike | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint that `Trainer.train(resume_from_checkpoint=requested)` resumes from, checked
    complete: None (or False) for none, True for the last complete one in `output_dir`.

    >>> checkpoint_to_resume(True, "output/run")            # doctest: +SKIP
    'output/run/checkpoint-2'

    Raises:
        IncompleteCheckpointError: a named checkpoint that lacks a file or has a truncated one.
        ValueError: True, and `output_dir` holds no complete checkpoint.
    """
    if requested is None or requested is False:
        return None
    if requested is True:
        last = last_complete_checkpoint(output_dir)
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint (incomplete "
                "ones are named in the warnings above); pass resume_from_checkpoint=None to start afresh"
            )
        return last
    check_checkpoint(requested)
    return str(requested)


def _is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it came from, is the operating system's 'no space left'."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(path: Path) -> int | None:
    """Free space on the disk that holds `path` (or its nearest existing parent)."""
    for directory in (path, *path.parents):
        if directory.exists():
            try:
                return shutil.disk_usage(directory).free
            except OSError:
                return None
    return None


def save_failure_message(path: str | os.PathLike, what: str, error: BaseException) -> str:
    """What to tell when saving `what` (e.g. "checkpoint") to `path` raised `error`: the path, the
    cause as far as it can be known (torch reports a full disk as '... unexpected pos'), what was
    left behind, and what to do."""
    path = Path(path)
    free = _free_bytes(path)
    free_text = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
    if _is_disk_full(error) or (free is not None and free < _FULL_DISK_BYTES):
        cause = f"the disk is full ({free_text} on the disk that holds it)"
    else:
        cause = f"{free_text} on its disk"
    message = f"saving the {what} to {path} failed ({type(error).__name__}: {error}): {cause}."
    if what == "checkpoint":
        message += (
            f" {path} is incomplete: resume_from_checkpoint auto skips it, and refuses it when named. Free some "
            "space (older checkpoints, save_total_limit), delete it, and resume from the last complete checkpoint"
        )
    return message


@contextlib.contextmanager
def reporting_save_failures(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn any error raised while saving `what` to `path` into a `CheckpointSaveError` that says so."""
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as error:
        raise CheckpointSaveError(save_failure_message(path, what, error)) from error
