"""The files a run saves beside its model (or adapter), besides what transformers writes.

- `tasks.json`: the task registry (names, ids, weights), so that ids in logs keep their meaning;
- `coba_state.json`: the CoBa balancer's state (weighted_loss_mode coba), for resume;
- `run_config.yaml`: the resolved recipe (model, data and training settings, dataset summary), from
  which scripts/chat.py and merge_lora.py read the prompt format (`chat_template`, ...);
- `generation_config.json`: for an adapter too (PEFT saves none), so that generation stops at the
  trained end-of-turn token.

`MFTTrainer.save_model` writes them into every checkpoint and the final directory, before anything is
pushed to the Hub, so a Hub copy is as complete as the local one.

>>> write_run_config("output/run1", {"data": {"chat_template": "model"}})        # doctest: +SKIP
>>> read_run_config("output/run1")["data"]["chat_template"]                      # doctest: +SKIP
'model'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .tasks import TASKS_FILE

COBA_STATE_FILE = "coba_state.json"
RUN_CONFIG_FILE = "run_config.yaml"
GENERATION_CONFIG_FILE = "generation_config.json"
RUN_ARTIFACTS = (TASKS_FILE, COBA_STATE_FILE, RUN_CONFIG_FILE, GENERATION_CONFIG_FILE)


def write_run_config(output_dir: str | os.PathLike, run_config: Mapping[str, Any]) -> Path:
    """Write the resolved recipe as `run_config.yaml` (keys in the order given)."""
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
