"""The files a run saves beside its model (or adapter), besides what transformers writes: the one
module that names, writes and reads them.

- `tasks.json`: the task registry (names, ids, weights), so that ids in logs keep their meaning;
- `coba_state.json`: the CoBa balancer's state (weighted_loss_mode coba), for resume;
- `run_config.yaml`: the run's settings (training, data and, from scripts/train.py, model settings
  and the dataset summary), from which scripts/chat.py and merge_lora.py read the prompt format
  (`data.chat_template`, `data.role_markers`, `data.eos_token`);
- `generation_config.json`: for an adapter too (PEFT saves none), so that generation stops at the
  trained end-of-turn token.

`MFTTrainer.save_model` writes them (`save_run_artifacts`) into every checkpoint and the final
directory, before anything is pushed to the Hub, so a Hub copy is as complete as the local one.

>>> write_run_config("output/run1", {"data": {"chat_template": "model"}})        # doctest: +SKIP
>>> read_run_config("output/run1")["data"]["chat_template"]                      # doctest: +SKIP
'model'
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TASKS_FILE = "tasks.json"
COBA_STATE_FILE = "coba_state.json"
RUN_CONFIG_FILE = "run_config.yaml"
GENERATION_CONFIG_FILE = "generation_config.json"
RUN_ARTIFACTS = (TASKS_FILE, COBA_STATE_FILE, RUN_CONFIG_FILE, GENERATION_CONFIG_FILE)


def write_tasks(directory: str | os.PathLike, registry: Mapping[str, Any]) -> Path:
    """Write a task registry (`TaskRegistry.to_dict()`) as `tasks.json` into `directory`."""
    path = Path(directory) / TASKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(registry), indent=2) + "\n")
    return path


def read_tasks(path: str | os.PathLike) -> dict[str, Any]:
    """The task registry dict of `tasks.json`, or of the `tasks.json` in a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / TASKS_FILE
    return json.loads(path.read_text())


def write_coba_state(directory: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write the CoBa balancer's `state_dict()` as `coba_state.json` into `directory`."""
    path = Path(directory) / COBA_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(state), f)
    return path


def read_coba_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The CoBa state saved in `directory` (a checkpoint), or None when it has none."""
    path = Path(directory) / COBA_STATE_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_run_config(output_dir: str | os.PathLike, run_config: Mapping[str, Any]) -> Path:
    """Write the run's settings as `run_config.yaml` (keys in the order given)."""
    import yaml

    path = Path(output_dir) / RUN_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dict(run_config), f, sort_keys=False)
    return path


def read_run_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The run config saved in `model_dir`, or {} when there is none."""
    import yaml

    path = Path(model_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def has_generation_config(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a `generation_config.json`."""
    return (Path(directory) / GENERATION_CONFIG_FILE).is_file()


def write_generation_config(directory: str | os.PathLike, model: Any) -> Path | None:
    """Save `model.generation_config` into `directory` unless it holds one already (the model's own
    save writes it; PEFT saves the adapter only). Returns the path written, or None."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or has_generation_config(directory):
        return None
    generation_config.save_pretrained(str(directory))
    return Path(directory) / GENERATION_CONFIG_FILE


def copy_run_artifacts(
    source: str | os.PathLike, target: str | os.PathLike, names: Iterable[str] = RUN_ARTIFACTS
) -> list[str]:
    """Copy the run artefacts `names` that `source` holds into `target`; returns the names copied."""
    copied = []
    for name in names:
        if (Path(source) / name).is_file():
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def save_run_artifacts(
    directory: str | os.PathLike, tasks: Mapping[str, Any], run_config: Mapping[str, Any], model: Any
) -> None:
    """Write the run artefacts of a saved model into `directory`: the task registry
    (`TaskRegistry.to_dict()`), the run config and the model's generation config (if the directory
    has none). CoBa writes its own state (`write_coba_state`).

    >>> save_run_artifacts("out", trainer.tasks.to_dict(), {"training": args.to_dict()}, model)  # doctest: +SKIP
    """
    write_tasks(directory, tasks)
    write_run_config(directory, run_config)
    write_generation_config(directory, model)
